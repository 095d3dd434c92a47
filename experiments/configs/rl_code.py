"""GRPO on generated code tasks graded by their tests in the sandbox: warm-up on the reference
solutions, then GRPO. The tiny byte-level policy rarely passes; this is a smoke test of the loop."""

from experiments.configs.rl_base import rl_config


def get_config():
    c = rl_config()
    c.task = "code"
    c.model.max_position_embeddings = 1024
    c.max_new_tokens = 160
    c.sft_steps = 100
    c.sft_batch = 16
    c.prompts_per_step = 4
    c.group_size = 4
    c.steps = 10
    c.eval_every = 5
    c.eval_tasks = 16
    c.format_weight = 0.1
    return c
