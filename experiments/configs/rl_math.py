"""The README's RL recipe: format warm-up, then GRPO on generated one-digit addition (tiny preset, CPU)."""

from experiments.configs.rl_base import rl_config


def get_config():
    return rl_config()
