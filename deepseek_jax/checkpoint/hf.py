"""HF safetensors <-> our params (spec §7): names, layouts, validation.

HF stores linear weights [out, in]; ours are [in..., out...] (e.g. q_b_proj [Q, H, K]), and
layers are stacked along a leading axis per scanned group (dense_layers, moe_layers), routed
experts along a second one. The MTP module is layer `num_hidden_layers + k`; its copies of the
embedding and head are not separate params here (ours shares the main ones).

This is the unquantised loader/saver; FP8 checkpoints, sharded streaming and Orbax live in the
checkpoint issue's work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from math import prod

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from deepseek_jax.config import ModelConfig

_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple[str, ...]      # into our params
    index: tuple[int, ...]     # into stacked leading axes (layer, expert)
    n_in: int | None           # linear: number of leading input dims in our layout; None: copy


def _block_entries(prefix, path, index, moe, cfg):
    out = []
    linear = lambda hf, p, n_in=1: out.append(Entry(prefix + hf, path + p, index, n_in))
    vector = lambda hf, p: out.append(Entry(prefix + hf, path + p, index, None))
    vector("input_layernorm.weight", ("attn_norm", "scale"))
    vector("post_attention_layernorm.weight", ("ffn_norm", "scale"))
    a = "self_attn."
    linear(a + "q_a_proj.weight", ("attn", "q_a_proj", "kernel"))
    vector(a + "q_a_layernorm.weight", ("attn", "q_a_norm", "scale"))
    linear(a + "q_b_proj.weight", ("attn", "q_b_proj", "kernel"))
    linear(a + "kv_a_proj_with_mqa.weight", ("attn", "kv_a_proj", "kernel"))
    vector(a + "kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale"))
    linear(a + "kv_b_proj.weight", ("attn", "kv_b_proj"))
    linear(a + "o_proj.weight", ("attn", "o_proj", "kernel"), 2)
    linear(a + "indexer.wq_b.weight", ("attn", "indexer", "wq_b", "kernel"))
    linear(a + "indexer.wk.weight", ("attn", "indexer", "wk", "kernel"))
    vector(a + "indexer.k_norm.weight", ("attn", "indexer", "k_norm", "scale"))
    vector(a + "indexer.k_norm.bias", ("attn", "indexer", "k_norm", "bias"))
    linear(a + "indexer.weights_proj.weight", ("attn", "indexer", "weights_proj", "kernel"))
    mlp = ("mlp", "shared") if moe else ("mlp",)
    hf_mlp = "mlp.shared_experts." if moe else "mlp."
    for proj in ("gate_proj", "up_proj", "down_proj"):
        linear(hf_mlp + proj + ".weight", mlp + (proj, "kernel"))
    if moe:
        linear("mlp.gate.weight", ("mlp", "gate"))
        vector("mlp.gate.e_score_correction_bias", ("mlp", "gate_bias"))
        for e in range(cfg.n_routed_experts):
            for proj, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                out.append(Entry(f"{prefix}mlp.experts.{e}.{proj}.weight", path + ("mlp", ours), index + (e,), 1))
    return out


def hf_entries(cfg: ModelConfig, *, mtp: bool = True) -> list[Entry]:
    """Every HF tensor of a model with this config, mapped to our params."""
    entries = [
        Entry("model.embed_tokens.weight", ("embed",), (), None),
        Entry("model.norm.weight", ("final_norm", "scale"), (), None),
        Entry("lm_head.weight", ("lm_head",), (), 1),
    ]
    for layer in range(cfg.num_hidden_layers):
        moe = layer >= cfg.first_k_dense_replace
        group, i = ("moe_layers", layer - cfg.first_k_dense_replace) if moe else ("dense_layers", layer)
        entries += _block_entries(f"model.layers.{layer}.", (group,), (i,), moe, cfg)
    for k in range(cfg.num_nextn_predict_layers if mtp else 0):
        prefix, path = f"model.layers.{cfg.num_hidden_layers + k}.", (f"mtp_{k}",)
        entries += _block_entries(prefix, path + ("block",), (), True, cfg)
        entries += [
            Entry(prefix + "enorm.weight", path + ("enorm", "scale"), (), None),
            Entry(prefix + "hnorm.weight", path + ("hnorm", "scale"), (), None),
            Entry(prefix + "eh_proj.weight", path + ("eh_proj", "kernel"), (), 1),
            Entry(prefix + "shared_head.norm.weight", path + ("shared_head_norm", "scale"), (), None),
        ]
    return entries


def param_shapes(cfg: ModelConfig) -> dict:
    """Abstract params (ShapeDtypeStruct leaves, unboxed) of a model with this config."""
    from flax import linen as nn

    from deepseek_jax.model import Transformer

    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.PRNGKey(0), t)["params"], tokens)
    return nn.meta.unbox(shapes)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _hf_shape(entry: Entry, leaf_shape) -> tuple[int, ...]:
    shape = tuple(leaf_shape[len(entry.index):])
    if entry.n_in is None:
        return shape
    return (prod(shape[entry.n_in:]), prod(shape[:entry.n_in]))


def _checkpoint_files(path: str) -> dict[str, str]:
    """tensor name -> file, from model.safetensors.index.json or the *.safetensors files."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"load_hf: {index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise ValueError(f"load_hf: shard files named in the index are missing: {missing}")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"load_hf: no *.safetensors files in {path}")
    names = {}
    for f in files:
        with safe_open(os.path.join(path, f), "numpy") as st:
            names.update({k: os.path.join(path, f) for k in st.keys()})
    return names


def load_hf(path, *, dtype=None):
    """Loads an unquantised HF/DeepSeek safetensors checkpoint directory -> (cfg, params).

    dtype=None keeps the checkpoint's own dtype for params and compute alike; a dtype string
    ("float32", "bfloat16") sets both. Every missing, unexpected or misshapen tensor is listed
    in one ValueError before any array is built.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"load_hf: no config.json in {path}")
    with open(config_file) as f:
        hf_config = json.load(f)
    if hf_config.get("quantization_config"):
        raise ValueError("load_hf: quantization_config: FP8 checkpoints are not supported by this loader yet")
    files = _checkpoint_files(path)

    if dtype is None:
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or _first_float_dtype(files)
    cfg = ModelConfig.from_hf_config(hf_config, dtype=str(dtype), param_dtype=str(dtype))

    entries = hf_entries(cfg)
    mtp_names = {e.hf_name for e in entries if e.path[0].startswith("mtp_")}
    if mtp_names and not (mtp_names & files.keys()):
        logging.warning("load_hf: config asks for %d MTP module(s) but the checkpoint has none; loading without MTP",
                        cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
        entries = hf_entries(cfg)
    shapes = param_shapes(cfg)

    expected = {e.hf_name: e for e in entries}
    ignorable = {n for n in files if n.startswith(f"model.layers.{cfg.num_hidden_layers}") and n.endswith(_MTP_COPIES)}
    problems = [f"missing: {n}" for n in sorted(expected.keys() - files.keys())]
    problems += [f"unexpected: {n}" for n in sorted(files.keys() - expected.keys() - ignorable)]
    handles: dict[str, object] = {}
    for name, entry in expected.items():
        if name not in files:
            continue
        st = handles.setdefault(files[name], safe_open(files[name], "numpy"))
        got = tuple(st.get_slice(name).get_shape())
        want = _hf_shape(entry, _get(shapes, entry.path).shape)
        if got != want:
            problems.append(f"shape: {name}: expected {want}, got {got}")
    if problems:
        raise ValueError(f"load_hf: {path} does not match its config ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))

    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    for name, entry in expected.items():
        w = handles[files[name]].get_tensor(name)
        leaf = _get(params, entry.path)
        target = leaf[entry.index] if entry.index else leaf
        if entry.n_in is not None:
            w = w.T.reshape(target.shape)
        target[...] = w.astype(leaf.dtype)
    return cfg, jax.tree.map(jnp.asarray, params)


def _first_float_dtype(files: dict[str, str]) -> str:
    name, file = next(iter(files.items()))
    with safe_open(file, "numpy") as st:
        return str(st.get_tensor(name).dtype)


def save_hf(path, cfg: ModelConfig, params) -> None:
    """Writes config.json + model.safetensors (params' dtype; the fp32-pinned tensors stay fp32),
    loadable by transformers' DeepseekV32ForCausalLM and by `load_hf`."""
    from flax import linen as nn

    params = nn.meta.unbox(params)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for entry in hf_entries(cfg):
        w = np.asarray(_get(params, entry.path))
        w = w[entry.index] if entry.index else w
        if entry.n_in is not None:
            w = w.reshape(prod(w.shape[:entry.n_in]), -1).T
        tensors[entry.hf_name] = np.ascontiguousarray(w)
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_config(), f, indent=2)
