"""Training metrics: a FLOP estimate (TFLOP/s, MFU) and writers for JSON lines and TensorBoard
(scalar event files through `tensorboardX`, which needs no TensorFlow).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device, by substring of `device_kind` (first match wins).
_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("v6", 918e12), ("v5p", 459e12),
               ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12))


def peak_flops_per_device(device=None) -> float | None:
    """The bf16 dense peak of a known accelerator, else None (CPUs and unknown chips: no MFU)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in _PEAK_FLOPS if name.lower() in kind.lower()), None)


def train_flops_per_token(cfg, params, seq_len: int, attention: str, with_mtp: bool) -> float:
    """Estimated training FLOPs per token: 6 × active matmul params (routed experts counted at
    k/E, the embedding lookup not at all) + causal attention and indexer scores (× 3 for fwd+bwd)."""
    active = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "embed" or (not with_mtp and names[0].startswith("mtp")):
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if names[-1] in ("w_gate", "w_up", "w_down") else 1.0
        active += x.size * share
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    causal = (seq_len + 1) / 2  # mean keys a query sees
    keys = np.mean(np.minimum(np.arange(1, seq_len + 1), cfg.index_topk)) if attention == "sparse" else causal
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys
    indexer = 2 * cfg.index_n_heads * cfg.index_head_dim * causal if attention == "sparse" else 0.0
    return 6 * active + 3 * layers * (attn + indexer)


def append_jsonl(path: str, record: dict) -> None:
    """One JSON object per line; appended and closed at once, so a killed run loses nothing logged."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class EventWriter:
    """Scalars into a TensorBoard event file in `logdir`, flushed at each call so a killed run
    keeps every logged step."""

    def __init__(self, logdir: str):
        self._writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
