"""Pretraining that teaches the RL recipe's policy the task format: the model experiments/rl.py
builds (configs/rl_base.py), trained on generated task text written by

    python -m experiments.task_corpus --config=experiments/configs/rl_math.py --out=/tmp/deepseek_jax_math_corpus.jsonl

(override the path with --config.data). Its workdir is rl.py's `init_from`. A few minutes on 2 CPU cores.
"""

from deepseek_jax.chat.markup import BOS
from experiments.configs.base import base_config
from experiments.configs.rl_base import rl_config


def get_config():
    c = base_config()
    c.model = rl_config().model
    c.model.vocab_size = 258  # the tokenizer trainer's least: 256 bytes + BOS/EOS, no merges
    c.model.dtype = "float32"  # faster on CPU; rl.py's own compute dtype applies after init_from
    c.data = "/tmp/deepseek_jax_math_corpus.jsonl"
    c.steps = 200
    # One demonstration per window (at most 15 tokens; the rest untrained EOS), as GRPO's prompts
    # are seen: packed several to a window, the policy learnt the training sums but not held-out ones.
    c.data_per_window = True
    c.batch_size = 64
    c.seq_len = 16
    c.checkpoint_every = 50
    c.bias_update_rate = 1e-2  # a few hundred steps: see configs/tiny.py
    c.sample_prompt = BOS + "Q: 3+4 A:"
    c.sample_tokens = 3
    return c
