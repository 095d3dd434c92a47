"""The small preset (~200M params, ~60M active): a GPU smoke test, or a slow CPU run."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="small", vocab_size=32768, dtype="bfloat16")
    c.batch_size = 16
    c.seq_len = 512
    c.steps = 2000
    c.learning_rate = 1e-3
    c.indexer_learning_rate = 1e-3
    c.warmup_steps = 100
    c.checkpoint_every = 500
    c.log_every = 20
    return c
