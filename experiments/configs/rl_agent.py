"""GRPO on synthesized store environments: multi-turn tool-calling episodes in the chat format,
rewarded by each environment's verifier. No warm-up (there are no demonstrations yet), so the
tiny byte-level policy starts malformed; this is a smoke test of the multi-turn loop."""

from experiments.configs.rl_base import rl_config


def get_config():
    c = rl_config()
    c.task = "agent"
    c.model.max_position_embeddings = 4096  # the tool schemas alone are ~1.4K byte tokens
    c.levels = (1, 2)
    c.max_turns = 4
    c.max_new_tokens = 96
    c.sft_steps = 0
    c.prompts_per_step = 2
    c.group_size = 4
    c.steps = 4
    c.eval_every = 2
    c.eval_tasks = 4
    c.format_weight = 0.1
    return c
