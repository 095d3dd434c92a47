"""Decode state: per layer the MLA latent rows and the indexer keys, preallocated (spec §2 "Caches", §3 step 10).

`Cache(layers, lengths)` is a plain pytree that flows through `jax.jit` as an input and an output.
`lengths` [B] int32 counts the valid rows of each sequence; rows at or past it are stale and are
overwritten as the sequence grows, so sequences of different lengths share one batch. `layers`
maps each of the model's `nn.scan` groups ("dense_layers", "moe_layers"; "mtp" for MTP
speculative decoding) to a `LayerCache` stacked over that group's layers:

  kv            [L, B, S, C + R]  compute dtype. Row s is [c_kv ; k_rope] of token s: the
                                  RMSNorm'd latent and the RoPE'd shared key, i.e. the 576-d
                                  absorbed-mode key whose first C dims are the value. One array,
                                  so attention reads a selected row in place
                                  (`ops.sparse_mla_decode`) without concatenating the cache.
  index_k       [L, B, S, I]      indexer keys (RoPE'd; Hadamard-rotated e4m3 with cfg.index_fp8)
  index_k_scale [L, B, S]         float32 per-token e4m3 scale (cfg.index_fp8), else None

A layer addresses its rows as (group cache, layer index) and reads and writes the stacked arrays
in place: the cache travels through the layer scan as part of the carry. Scanning a layer's slice
in and out instead copies the whole cache every step (measured on CPU at S = 32K, 4 layers:
128 ms per step against 0.14 ms in place).

Legend: L layers in a group, B batch, S max length, T new tokens, C kv latent rank, R rope dim,
I indexer head dim.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    kv: jax.Array
    index_k: jax.Array
    index_k_scale: jax.Array | None


class Cache(NamedTuple):
    layers: dict
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return next(iter(self.layers.values())).kv.shape[2]


def group_sizes(cfg, *, mtp: bool = False) -> dict[str, int]:
    """Layers per cached group, in model order (groups with no layers are absent)."""
    sizes = {"dense_layers": cfg.first_k_dense_replace, "moe_layers": cfg.num_moe_layers}
    if mtp:
        sizes["mtp"] = cfg.num_nextn_predict_layers
    return {name: n for name, n in sizes.items() if n}


def init_cache(cfg, batch: int, max_len: int, *, mtp: bool = False) -> Cache:
    """An empty cache (all lengths 0) for `batch` sequences of up to `max_len` tokens."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    if mtp and not cfg.num_nextn_predict_layers:
        raise ValueError("init_cache: mtp=True but cfg.num_nextn_predict_layers is 0")
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    key_dtype = jnp.float8_e4m3fn if cfg.index_fp8 else cfg.compute_dtype

    def group(n):
        return LayerCache(
            kv=jnp.zeros((n, batch, max_len, width), cfg.compute_dtype),
            index_k=jnp.zeros((n, batch, max_len, cfg.index_head_dim), key_dtype),
            index_k_scale=jnp.zeros((n, batch, max_len), jnp.float32) if cfg.index_fp8 else None)

    layers = {name: group(n) for name, n in group_sizes(cfg, mtp=mtp).items()}
    return Cache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def write(group: LayerCache, layer, start, kv, index_k, index_k_scale) -> LayerCache:
    """Stores T new tokens of layer `layer` at rows start[b] + t: kv [B,T,C+R], index_k [B,T,I],
    index_k_scale [B,T] or None. The caller keeps start + T <= S: the scatter is promised in
    bounds (a bounds-checked scatter becomes a select over the whole cache, O(S) per step)."""
    b, t = kv.shape[:2]
    rows = jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    batch = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    put = lambda cache, new: cache.at[layer, batch, rows].set(new.astype(cache.dtype), mode="promise_in_bounds")
    scale = None if group.index_k_scale is None else put(group.index_k_scale, index_k_scale)
    return LayerCache(kv=put(group.kv, kv), index_k=put(group.index_k, index_k), index_k_scale=scale)


def layer_kv(group: LayerCache, layer) -> jax.Array:
    """All rows of one layer, kv [B, S, C+R] (dense attention reads every row anyway)."""
    return group.kv[layer]


def index_key_stack(group: LayerCache):
    """(index_k [L, B, S, I], index_k_scale [L, B, S] or None): every layer's indexer keys, for
    `ops.indexer_topk_decode`, which reads one layer of them in place (no copy of the layer)."""
    return group.index_k, group.index_k_scale
