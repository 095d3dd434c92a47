"""DeepSeek-V3.2 (671B) DSA continued pre-training, sparse stage (spec §4): 480 × 128K-token
sequences per step at lr 7.3e-6. The dense warm-up is `--config.dsa_stage=dense_warmup
--config.learning_rate=1e-3 --config.indexer_learning_rate=1e-3 --config.steps=1000
--config.batch_size=16`; the sparse stage then starts with `--config.init_from=<warm-up workdir>`.
Needs a pod slice (see the README's memory planner for the mesh)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="v32-671b", vocab_size=129280, dtype="bfloat16", remat="full")
    c.tokenizer = "path/to/DeepSeek-V3.2/tokenizer.json"
    c.batch_size = 480
    c.seq_len = 131072
    c.steps = 15000
    c.learning_rate = 7.3e-6
    c.indexer_learning_rate = 7.3e-6
    c.warmup_steps = 0
    c.min_lr_ratio = 1.0
    c.mtp_weight = 0.1
    c.mesh = "fsdp=8,expert=-1"
    c.rules = "fsdp_ep"
    c.checkpoint_every = 100
    c.log_every = 1
    c.indexer_recall = False
    return c
