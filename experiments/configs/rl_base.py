"""Defaults every RL config starts from (`experiments/rl.py` documents the loop)."""

import ml_collections
from ml_collections import config_dict

from experiments.configs.base import model_fields


def rl_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Policy: a ModelConfig preset (fields set, not None, override it). Byte-level tokens need a vocab
    # >= 256 (a policy pretrained by configs/rl_format.py has 258: bytes + BOS/EOS; pass
    # --config.model.vocab_size=258 with its init_from).
    c.model = model_fields("tiny", vocab_size=256)
    c.init_from = ""              # a pretraining workdir, or an HF safetensors dir of a byte-level policy;
    #                               "" = random byte-level init + SFT warm-up
    c.seed = 0
    # Task: "math", "code" or "agent", drawn evenly from these difficulty levels (rl/envs/)
    c.task = "math"
    c.levels = (1,)
    c.max_turns = 1               # replies per episode (agent: tool-calling turns)
    c.thinking_mode = "chat"      # agent episodes: "chat" or "thinking" (chat format, spec §9)
    c.code_timeout_s = 5.0        # sandbox wall-clock limit per graded completion
    # Format warm-up: supervised steps on task demonstrations before GRPO (skipped with init_from)
    c.sft_steps = 150
    c.sft_batch = 64
    c.sft_learning_rate = 3e-3
    # GRPO (spec §8): every step samples group_size episodes of prompts_per_step fresh tasks from the
    # current params (π_old) and takes inner_steps AdamW steps on that batch
    c.steps = 40
    c.prompts_per_step = 16
    c.group_size = 8
    c.inner_steps = 2
    c.learning_rate = 3e-4
    c.max_new_tokens = 6          # per reply
    c.temperature = 1.0
    c.top_p = 1.0
    c.top_k = 0                   # 0 = off
    c.kl_coef = 0.0               # β
    c.kl_estimator = "unbiased"   # unbiased | k3 | k1
    c.clip_low = 0.2              # ε_low
    c.clip_high = 0.28            # ε_high
    c.offpolicy_delta = config_dict.placeholder(float)  # δ; None: no off-policy sequence masking
    c.normalize_std = False       # divide advantages by the group's std (classic GRPO) for comparison
    c.keep_routing = True
    c.keep_sampling_mask = True
    # Extra reward terms, added to the verifier's 0/1 (0 = off)
    c.format_weight = 0.0         # × 1 when every reply followed the task's format
    c.language_weight = 0.0       # × share of the replies' words in the prompt's script
    c.length_penalty = 0.0        # up to −this when the episode's tokens pass length_budget of the maximum
    c.length_budget = 0.8
    # Held-out pass@1 (greedy) every eval_every steps on eval_tasks fixed tasks never trained on
    c.eval_every = 5
    c.eval_tasks = 48
    c.log_every = 1
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    return c
