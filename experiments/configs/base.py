"""Defaults every preset config starts from (`experiments/pretrain.py` documents the fields)."""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from deepseek_jax.config import ModelConfig


def model_fields(preset: str, **values) -> ml_collections.ConfigDict:
    """`config.model`: a ModelConfig preset and every ModelConfig field, None (the preset's value)
    unless given here, so that any field can be set on the command line (`--config.model.index_topk=64`;
    ml_collections only overrides keys that exist)."""
    types = typing.get_type_hints(ModelConfig)
    unknown = set(values) - set(types)
    if unknown:
        raise ValueError(f"model_fields: not ModelConfig fields: {sorted(unknown)}")
    fields = {f.name: values.get(f.name, config_dict.placeholder(types[f.name])) for f in dataclasses.fields(ModelConfig)}
    return ml_collections.ConfigDict({"preset": preset, **fields})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model: a ModelConfig preset; the fields set (not None) override the preset's.
    c.model = model_fields("tiny", vocab_size=1024, dtype="float32", remat="none", attention_impl="auto")
    # Run
    c.steps = 200
    c.batch_size = 8              # sequences per micro-batch (global, over every device)
    c.grad_accum_steps = 1        # micro-batches per optimizer step
    c.seq_len = 64
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.mesh = "data=-1"            # sharding.mesh spec
    c.rules = "dp"                # sharding.rules preset: dp | fsdp | fsdp_ep | tp_ep
    # Optimizer: AdamW, linear warm-up then cosine decay to min_lr_ratio · peak
    c.learning_rate = 3e-3
    c.indexer_learning_rate = 3e-3
    c.warmup_steps = 20
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.1
    c.grad_clip = 1.0
    c.indexer_grad_clip = 1.0
    # Losses (spec §4-§6)
    c.dsa_stage = "sparse"        # dense_warmup | sparse | off
    c.mtp_weight = 0.3            # λ
    c.balance_weight = 1e-4       # α
    c.indexer_weight = 1.0        # KL coefficient
    c.bias_update_rate = 1e-3     # γ
    c.indexer_recall = True
    c.init_from = ""              # a workdir (or its checkpoints/ dir) whose latest params start this run
    # Data: comma-separated text/jsonl files or directories; empty = the embedded corpus
    c.data = ""
    c.data_max_bytes = 0          # stop reading the corpus after this many bytes (0: all)
    c.data_per_window = False     # each document starts its own window (padded, untrained), none shares it
    c.tokenizer = ""              # a tokenizer.json; empty = train a byte-level BPE (saved in the workdir)
    # Sampling at the end of the run
    c.sample_prompt = "import os\n\n\ndef"  # no trailing space: byte-level BPE glues spaces to the next word
    c.sample_tokens = 48          # 0 = no sample
    c.sample_temperature = 0.0    # 0 = greedy
    c.peak_tflops = 0.0           # per device, for MFU; 0 = known accelerators only
    return c
