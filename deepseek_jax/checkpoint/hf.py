"""HF/DeepSeek safetensors <-> our params (spec §7): names, layouts, FP8, streaming, sharding.

HF stores linear weights [out, in]; ours are [in..., out...] (e.g. q_b_proj [Q, H, K]), and
layers are stacked along a leading axis per scanned group (dense_layers, moe_layers), routed
experts along a second one. The MTP module is layer `num_hidden_layers + k`; its copies of the
embedding and head are not separate params here (ours shares the main ones).

Loading streams: every tensor is read on its own through a memory map (FP8 ones dequantised
blockwise on the host), moved to its target sharding and written in place into its stacked
parameter (a donated buffer), so host memory holds about one tensor at a time, never the model.
Every problem (missing, unexpected, misshapen, wrong dtype, truncated file) is found from the
headers alone and reported in one ValueError before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from math import prod

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from deepseek_jax.fp8 import dequantize_weight_blocks, quantize_weight_blocks
from deepseek_jax.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor, write_file
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import scale_shape
from deepseek_jax.params import abstract_params, check_params, param_shardings

_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")
# Linear weights that DeepSeek's release keeps unquantised (spec §7).
_NEVER_FP8 = ("lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight")
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple[str, ...]      # into our params
    index: tuple[int, ...]     # into stacked leading axes (layer, expert)
    n_in: int | None           # linear: number of leading input dims in our layout; None: copy

    @property
    def fp8_eligible(self) -> bool:
        return self.n_in is not None and not self.hf_name.endswith(_NEVER_FP8)


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


def hf_entries(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of a model with this config (scales aside), mapped to our params."""
    entries = [
        Entry("model.embed_tokens.weight", ("embed",), (), None),
        Entry("model.norm.weight", ("final_norm", "scale"), (), None),
        Entry("lm_head.weight", ("lm_head",), (), 1),
    ]
    for layer in range(cfg.num_hidden_layers):
        moe = layer >= cfg.first_k_dense_replace
        group, i = ("moe_layers", layer - cfg.first_k_dense_replace) if moe else ("dense_layers", layer)
        entries += _block_entries(f"model.layers.{layer}.", (group,), (i,), moe, cfg)
    for k in range(cfg.num_nextn_predict_layers):
        prefix, path = f"model.layers.{cfg.num_hidden_layers + k}.", (f"mtp_{k}",)
        entries += _block_entries(prefix, path + ("block",), (), True, cfg)
        entries += [
            Entry(prefix + "enorm.weight", path + ("enorm", "scale"), (), None),
            Entry(prefix + "hnorm.weight", path + ("hnorm", "scale"), (), None),
            Entry(prefix + "eh_proj.weight", path + ("eh_proj", "kernel"), (), 1),
            Entry(prefix + "shared_head.norm.weight", path + ("shared_head_norm", "scale"), (), None),
        ]
    return entries


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _hf_shape(entry: Entry, leaf_shape) -> tuple[int, ...]:
    shape = tuple(leaf_shape[len(entry.index):])
    if entry.n_in is None:
        return shape
    return (prod(shape[entry.n_in:]), prod(shape[:entry.n_in]))


# ------------------------------------------------------------------------------------ loading
def _tensor_index(path: str) -> dict[str, TensorInfo]:
    """name -> TensorInfo over the checkpoint's files (the index, or every *.safetensors)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise ValueError(f"load_hf: {index}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"load_hf: shard files named in the index are missing: {missing}")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        weight_map = None
        if not files:
            raise ValueError(f"load_hf: no *.safetensors files in {path}")
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(os.path.join(path, f)).items():
            if weight_map is not None and weight_map.get(name) != f:
                raise ValueError(f"load_hf: {f} holds {name}, which the index places in {weight_map.get(name)}")
            infos[name] = info
    if weight_map is not None:
        absent = sorted(weight_map.keys() - infos.keys())
        if absent:
            raise ValueError(f"load_hf: tensors listed in the index are not in their files: {absent[:10]}")
    return infos


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"load_hf: no config.json in {path}")
    with open(config_file) as f:
        hf = json.load(f)
    quant = hf.get("quantization_config")
    if quant:
        bad = {k: quant.get(k) for k, v in (("quant_method", "fp8"), ("fmt", "e4m3"),
                                            ("weight_block_size", [128, 128])) if quant.get(k) != v}
        if bad:
            raise ValueError(f"load_hf: quantization_config: only fp8 e4m3 with 128x128 blocks is supported, got {bad}")
    return hf


def check_checkpoint(cfg: ModelConfig, infos: dict[str, TensorInfo], shapes) -> list[str]:
    """Every mismatch between a checkpoint's tensors and a model config, by name (headers only)."""
    expected = {e.hf_name: e for e in hf_entries(cfg)}
    problems = []
    allowed = set(expected)
    for name, entry in expected.items():
        info = infos.get(name)
        if info is None:
            problems.append(f"missing: {name}")
            continue
        want = _hf_shape(entry, _get(shapes, entry.path).shape)
        if info.shape != want:
            problems.append(f"shape: {name}: expected {want}, got {info.shape}")
        if info.dtype not in _FLOAT_DTYPES:
            problems.append(f"dtype: {name}: expected one of {_FLOAT_DTYPES}, got {info.dtype}")
        if info.dtype == "F8_E4M3":
            scale = infos.get(name + "_scale_inv")
            allowed.add(name + "_scale_inv")
            if entry.n_in is None:
                problems.append(f"dtype: {name}: FP8 is only supported for linear weights")
            elif scale is None:
                problems.append(f"missing: {name}_scale_inv (the FP8 block scales of {name})")
            elif scale.shape != scale_shape(want, n_in=1) or scale.dtype != "F32":
                problems.append(f"shape: {name}_scale_inv: expected F32 {scale_shape(want, n_in=1)}, "
                                f"got {scale.dtype} {scale.shape}")
    mtp_copies = {n for n in infos if n.endswith(_MTP_COPIES) and n.startswith("model.layers.")}
    problems += [f"unexpected: {n}" for n in sorted(infos.keys() - allowed - mtp_copies)]
    return problems


def _host_tensor(infos, entry: Entry, target_shape, dtype) -> np.ndarray:
    """One tensor in our layout and dtype, dequantised if stored as FP8."""
    info = infos[entry.hf_name]
    w = read_tensor(info)
    if info.dtype == "F8_E4M3":
        w = dequantize_weight_blocks(w, read_tensor(infos[entry.hf_name + "_scale_inv"]))
    if entry.n_in is not None:
        w = w.T
    return np.ascontiguousarray(w.reshape(target_shape).astype(dtype))


def _host_fp8(infos, entry: Entry, target_shape):
    """One linear weight kept in FP8, in our layout: (e4m3 kernel, float32 block scales [in/128, out/128])."""
    info = infos[entry.hf_name]
    w = read_tensor(info)
    if info.dtype == "F8_E4M3":
        scale_inv = read_tensor(infos[entry.hf_name + "_scale_inv"])
    else:  # an unquantised checkpoint loaded into FP8 storage: our own block quantiser
        w, scale_inv = quantize_weight_blocks(w)
    return np.ascontiguousarray(w.T.reshape(target_shape)), np.ascontiguousarray(scale_inv.T)


def _scale_path(path):
    return path[:-1] + (path[-1] + "_scale",)


@functools.lru_cache(maxsize=None)
def _writer(sharding):
    """In-place write of one tensor into a stacked buffer at (index..., 0...)."""
    def write(buf, w, index):
        start = tuple(index) + (0,) * w.ndim
        return jax.lax.dynamic_update_slice(buf, w.reshape((1,) * index.shape[0] + w.shape), start)
    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def load_hf(path, *, dtype=None, mesh=None, rules=None, keep_fp8=False, progress=False):
    """Loads an HF/DeepSeek safetensors checkpoint directory -> (cfg, params).

    dtype=None keeps the checkpoint's own dtype (bfloat16 for FP8 checkpoints) for params and
    compute alike; a dtype string ("float32", "bfloat16") sets both. `mesh` + `rules` (logical
    axis -> mesh axis pairs) place every param in its NamedSharding as it is read. `keep_fp8`
    keeps the linear weights DeepSeek ships in FP8 as e4m3 + block scales (cfg.weight_fp8),
    dequantised inside the matmuls: ~1 byte per parameter. `progress` shows a bar per tensor.
    """
    path = os.fspath(path)
    hf_config = _read_config(path)
    infos = _tensor_index(path)
    if dtype is None:
        dtype = "bfloat16" if hf_config.get("quantization_config") else (
            hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16")
    cfg = ModelConfig.from_hf_config(hf_config, dtype=str(dtype), param_dtype=str(dtype), weight_fp8=keep_fp8)

    mtp_names = {e.hf_name for e in hf_entries(cfg) if e.path[0].startswith("mtp_")}
    if mtp_names and not (mtp_names & infos.keys()):
        logging.warning("load_hf: config asks for %d MTP module(s) but the checkpoint has none; loading without MTP",
                        cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    shapes = abstract_params(cfg)
    problems = check_checkpoint(cfg, infos, shapes)
    if problems:
        raise ValueError(f"load_hf: {path} does not match its config ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))

    # Stacks are filled with sharding-agnostic updates, so build on an Auto-typed copy of the
    # mesh and hand back arrays in the caller's (possibly Explicit) shardings at the end.
    auto_mesh = None if mesh is None else jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    shardings = param_shardings(cfg, auto_mesh, rules)
    final_shardings = param_shardings(cfg, mesh, rules)
    by_leaf: dict[tuple, list[Entry]] = {}
    for entry in hf_entries(cfg):
        by_leaf.setdefault(entry.path, []).append(entry)
    params = jax.tree.map(lambda _: None, shapes)

    def place(leaf_path, tensors):
        """tensors: (index, host array) pairs of one leaf, consumed one at a time -> the leaf in its
        final sharding. Each write is waited for before the next tensor is read, so at most one
        host tensor is alive (dispatch is asynchronous: otherwise a slow device queues them all)."""
        shape, sharding = _get(shapes, leaf_path), _get(shardings, leaf_path)
        value = None
        for index, host in tensors:
            if not index:  # a single tensor: the whole leaf
                value = jax.device_put(host, sharding)
            else:  # a stack, filled in place one tensor at a time
                if value is None:
                    value = jax.jit(lambda: jnp.zeros(shape.shape, shape.dtype), out_shardings=sharding)()
                value = _writer(sharding)(value, host, np.asarray(index, np.int32))
            del host
            value.block_until_ready()
        final = _get(final_shardings, leaf_path)
        _set(params, leaf_path, value if final == sharding else jax.device_put(value, final))

    bar = tqdm.tqdm(total=sum(map(len, by_leaf.values())), desc="load_hf", unit="tensor", disable=not progress)
    for leaf_path, entries in by_leaf.items():
        bar.update(len(entries))
        shape = _get(shapes, leaf_path)
        tensor_shape = shape.shape[len(entries[0].index):]
        if shape.dtype == jnp.float8_e4m3fn:
            pairs = [(e.index, _host_fp8(infos, e, tensor_shape)) for e in entries]
            place(leaf_path, [(i, k) for i, (k, _) in pairs])
            place(_scale_path(leaf_path), [(i, sc) for i, (_, sc) in pairs])
        else:
            place(leaf_path, ((e.index, _host_tensor(infos, e, tensor_shape, shape.dtype)) for e in entries))
    bar.close()
    return cfg, params


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------ saving
def save_hf(path, cfg: ModelConfig, params, *, fp8: bool = False, max_shard_bytes: int = 4 << 30,
            progress: bool = False) -> None:
    """Writes the HF layout: config.json, model-XXXXX-of-XXXXX.safetensors shards and their index.

    Params keep their dtype (fp32-pinned tensors stay fp32); with `fp8` every linear
    weight DeepSeek ships in FP8 is block-quantised (e4m3, ue8m0 scales, `weight_scale_inv`).
    Params are checked against `cfg` first: a mismatch writes nothing.
    """
    params = nn.meta.unbox(params)
    shapes = abstract_params(cfg)
    check_params(params, shapes, what="save_hf")

    def leaf(path, index):
        return np.asarray(_get(params, path)[index] if index else _get(params, path))

    def tensors_of(entry: Entry) -> dict[str, np.ndarray]:
        w = leaf(entry.path, entry.index)
        if entry.n_in is not None:
            w = w.reshape(prod(w.shape[:entry.n_in]), -1).T
        if w.dtype == jnp.float8_e4m3fn:  # kept in FP8 (cfg.weight_fp8): scales are [in/128, out/128]
            scale_inv = np.ascontiguousarray(leaf(_scale_path(entry.path), entry.index).T)
            if fp8:
                return {entry.hf_name: np.ascontiguousarray(w), entry.hf_name + "_scale_inv": scale_inv}
            return {entry.hf_name: dequantize_weight_blocks(w, scale_inv).astype(cfg.params_dtype)}
        if fp8 and entry.fp8_eligible:
            q, scale = quantize_weight_blocks(w)
            return {entry.hf_name: q, entry.hf_name + "_scale_inv": scale}
        return {entry.hf_name: np.ascontiguousarray(w)}

    def nbytes(entry: Entry) -> int:
        size = prod(_hf_shape(entry, _get(shapes, entry.path).shape))
        return size if fp8 and entry.fp8_eligible else size * _get(shapes, entry.path).dtype.itemsize

    # (producer of {name: tensor}, bytes) in file order; MTP layers carry copies of embed and head.
    items = [(functools.partial(tensors_of, e), nbytes(e)) for e in hf_entries(cfg)]
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        items.append((lambda n=prefix + "embed_tokens.weight": {n: np.asarray(params["embed"])},
                      nbytes(Entry("", ("embed",), (), None))))
        items.append((lambda n=prefix + "shared_head.head.weight": {n: np.ascontiguousarray(np.asarray(params["lm_head"]).T)},
                      nbytes(Entry("", ("lm_head",), (), 1))))
    shards, current, current_bytes = [], [], 0
    for produce, size in items:
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(produce)
        current_bytes += size
    shards.append(current)

    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm.tqdm(shards, desc="save_hf", unit="shard", disable=not progress)):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for produce in shard:
            tensors.update(produce())
        write_file(os.path.join(path, name), tensors)
        weight_map.update({n: name for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = cfg.to_hf_config()
    if fp8:
        hf["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        hf["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
