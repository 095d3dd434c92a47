"""The README's main job: the tiny preset on the embedded corpus, a few minutes on a laptop CPU."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.data_max_bytes = 1_000_000
    c.steps = 250
    c.batch_size = 16
    # A few hundred steps: the aux-loss-free bias must move faster than V3's γ = 1e-3 to keep up.
    c.bias_update_rate = 1e-2
    return c
