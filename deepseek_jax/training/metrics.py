"""Training metrics: a FLOP estimate (TFLOP/s, MFU) and writers for JSON lines and TensorBoard.

No TensorBoard package is needed: `EventWriter` writes the event-file format itself (TFRecord
framing with masked CRC-32C around hand-encoded `Event{wall_time, step, summary{tag,
simple_value}}` protobufs), which TensorBoard reads like any other scalar log.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import jax
import numpy as np

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


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int = 0, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        msg += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        msg += _field(5, values)
    return msg


class EventWriter:
    """Scalars into a TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._record(_event(time.time(), file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        with open(self.path, "ab") as f:
            f.write(header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data)))

    def scalars(self, step: int, values: dict) -> None:
        self._record(_event(time.time(), step, scalars={k: float(v) for k, v in values.items()}))
