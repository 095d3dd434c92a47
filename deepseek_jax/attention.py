"""The one place that chooses dense vs sparse attention (and, through `pallas_kernels.ops`,
reference vs kernel) for MLA (spec §2-§3).

dense : MHA mode. Per-head keys/values expanded from the latent; causal softmax over all
        earlier tokens. The training / dense warm-up / short-prefill path.
sparse: absorbed MQA mode + DSA. The indexer picks `index_topk` keys per query; queries are
        absorbed into the latent (q̂ = W_UKᵀ q_nope) and attend over the gathered 576-d rows
        [c_kv ; k_rope], values = c_kv; the 512-d result is expanded by W_UV. Memory O(T·k).
auto  : sparse when T > index_topk, else dense (identical there: top-k keeps every key).

With a cache (`cached_mla_attention`, decode and speculative verification) the T new queries
attend, in absorbed mode, over the cached rows of their sequence up to their own position:
sparse picks the indexer's top-k of the cached keys (`ops.indexer_topk_decode`, one call for the
T queries on the stacked key cache; every key while a sequence holds at most index_topk of them,
which equals dense) and attends over those rows (`ops.sparse_mla_decode`, which reads them from
the stacked latent cache: no gathered copy of the rows, no copy of the layer); dense attends over
every cached row (V3.1-style decode, for comparison).

Legend: B batch, T queries, S keys, H heads, N nope dim, R rope dim, C latent rank, V v dim,
K index top-k, D = C + R.
"""

import jax
import jax.numpy as jnp

from deepseek_jax import cache as cache_lib
from pallas_kernels import ops

MODES = ("auto", "dense", "sparse")


def resolve_mode(mode: str, seq_len: int, cfg) -> str:
    if mode not in MODES:
        raise ValueError(f"attention mode: expected one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "sparse" if seq_len > cfg.index_topk else "dense"
    return mode


def dense_mha(q_nope, q_rope, c_kv, k_rope, kv_b, *, scale, nope_dim):
    """Causal MHA: q [B,T,H,N+R] against per-head keys from the latent; -> [B, T, H, V]."""
    dtype = q_nope.dtype
    kv = jnp.einsum("BSC,CHK->BSHK", c_kv, kv_b.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    k_nope, v = kv[..., :nope_dim], kv[..., nope_dim:]
    s = (jnp.einsum("BTHN,BSHN->BHTS", q_nope, k_nope, preferred_element_type=jnp.float32)
         + jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope, preferred_element_type=jnp.float32)) * scale
    t, s_len = q_nope.shape[1], c_kv.shape[1]
    causal = jnp.arange(s_len)[None, :] <= jnp.arange(t)[:, None]
    s = jnp.where(causal, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("BHTS,BSHV->BTHV", p.astype(dtype), v, preferred_element_type=jnp.float32).astype(dtype)


def _absorb_query(q_nope, q_rope, kv_b, nope_dim):
    """q̂ = [W_UKᵀ q_nope ; q_rope] [B, T, H, C + R], the 576-d absorbed query."""
    dtype = q_nope.dtype
    w_uk = kv_b.astype(dtype)[..., :nope_dim]
    q_abs = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.concatenate([q_abs, q_rope.astype(dtype)], axis=-1)


def _expand_values(o_latent, kv_b, nope_dim):
    """Per-head values from the attended latent: W_UV ô [B, T, H, V]."""
    w_uv = kv_b.astype(o_latent.dtype)[..., nope_dim:]
    return jnp.einsum("BTHC,CHV->BTHV", o_latent, w_uv, preferred_element_type=jnp.float32).astype(o_latent.dtype)


def sparse_mla_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, indices, *, scale, nope_dim, chunk_size, impl="auto",
                        unique_indices=False):
    """Absorbed-mode attention over the selected rows; -> [B, T, H, V]. unique_indices: see `ops.sparse_mla`."""
    q = _absorb_query(q_nope, q_rope, kv_b, nope_dim)
    kv = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)
    o_latent = ops.sparse_mla(q, kv, indices, scale=scale, v_dim=c_kv.shape[-1], chunk_size=chunk_size, impl=impl,
                              unique_indices=unique_indices)
    return _expand_values(o_latent, kv_b, nope_dim)


def mla_attention(q_nope, q_rope, c_kv, k_rope, kv_b, index_inputs, *, cfg, mode="auto"):
    """Returns (attention output [B, T, H, V], indexer indices [B, T, K] or None when dense)."""
    mode = resolve_mode(mode, q_nope.shape[1], cfg)
    scale, nope = cfg.softmax_scale, cfg.qk_nope_head_dim
    if mode == "dense":
        return dense_mha(q_nope, q_rope, c_kv, k_rope, kv_b, scale=scale, nope_dim=nope), None
    index_q, index_k, index_w, index_k_scale = index_inputs
    indices = ops.indexer_topk(index_q, index_k, index_w, k_scale=index_k_scale, topk=cfg.index_topk,
                               chunk_size=cfg.attention_chunk_size, impl=cfg.attention_impl)
    # The indexer's top-k never selects a key twice.
    out = sparse_mla_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, indices, scale=scale, nope_dim=nope,
                              chunk_size=cfg.attention_chunk_size, impl=cfg.attention_impl, unique_indices=True)
    return out, indices


def cached_mla_attention(q_nope, q_rope, kv_b, index_q, index_w, group, layer, start, *, cfg, mode):
    """Queries at positions start[b] + t over the cache rows already written for them (cache.py).

    q_nope/q_rope [B,T,H,N|R]; index_q [B,T,H_I,I] and index_w [B,T,H_I] from the indexer; the
    cached group and this layer's index in it; start [B]. Query t sees rows s <= start[b] + t.
    Returns (attention output [B, T, H, V], indices [B, T, K] or None when dense).
    """
    if mode not in ("sparse", "dense"):
        raise ValueError(f"cached attention mode: expected 'sparse' or 'dense', got {mode!r}")
    t = q_nope.shape[1]
    nope, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q = _absorb_query(q_nope, q_rope, kv_b, nope)
    limit = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :] + 1  # [B, T] rows visible to each query
    if mode == "dense":
        kv = cache_lib.layer_kv(group, layer)
        s = jnp.einsum("BTHD,BSD->BTHS", q, kv, preferred_element_type=jnp.float32) * cfg.softmax_scale
        visible = jnp.arange(kv.shape[1])[None, None, :] < limit[:, :, None]
        p = jax.nn.softmax(jnp.where(visible[:, :, None, :], s, -jnp.inf), axis=-1)
        o_latent = jnp.einsum("BTHS,BSC->BTHC", p.astype(q.dtype), kv[..., :c],
                              preferred_element_type=jnp.float32).astype(q.dtype)
        return _expand_values(o_latent, kv_b, nope), None

    # One indexer call for the T queries (1 in decode, 1 + drafts in speculative verification), each
    # limited to its own rows; the kernels read this layer of the stacked keys in place.
    index_k, index_k_scale = cache_lib.index_key_stack(group)
    indices = ops.indexer_topk_decode(index_q, index_k, index_w, layer, limit, k_scale=index_k_scale,
                                      topk=cfg.index_topk, impl=cfg.attention_impl)  # [B, T, K]
    # Attend over the selected rows; the kernels read them in place from this layer of the stacked cache.
    o_latent = ops.sparse_mla_decode(q, group.kv, layer, indices, scale=cfg.softmax_scale, v_dim=c,
                                     impl=cfg.attention_impl)
    return _expand_values(o_latent, kv_b, nope), indices
