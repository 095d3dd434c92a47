"""Pretraining that teaches the RL recipe's policy the task format: the model experiments/rl.py
builds (configs/rl_base.py), trained on generated task text written by

    python -m experiments.task_corpus --config=experiments/configs/rl_math.py --out=/tmp/deepseek_jax_math_corpus.jsonl

(override the path with --config.data). Its workdir is rl.py's `init_from`. Under a minute on 2 CPU cores.
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
    # One demonstration per window (at most 15 tokens; the rest untrained EOS), as GRPO's prompts
    # are seen: packed several to a window, the policy learnt the training sums but not held-out ones.
    c.data_per_window = True
    c.batch_size = 64
    c.seq_len = 16
    # A short warm-up with rl.py's own warm-up optimizer (constant learning rate, no weight decay, no
    # clipping) and the LM loss alone (no MTP; DSA is moot at 16 tokens). It leaves the policy knowing
    # most training sums and about half the held-out ones, from where GRPO improves held-out pass@1.
    # Trained longer (200 cosine steps) the policy reaches ~0.85 before GRPO and GRPO adds nothing; a
    # weaker start (60 steps) collapses onto a few answers under GRPO (README, measured).
    c.steps = 120
    c.warmup_steps = 0
    c.min_lr_ratio = 1.0
    c.weight_decay = 0.0
    c.grad_clip = 0.0
    c.indexer_grad_clip = 0.0
    c.mtp_weight = 0.0
    c.dsa_stage = "off"
    c.checkpoint_every = 40
    c.bias_update_rate = 1e-2  # a few hundred steps: see configs/tiny.py
    c.sample_prompt = BOS + "Q: 3+4 A:"
    c.sample_tokens = 3
    return c
