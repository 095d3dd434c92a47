"""The one place that chooses dense vs sparse attention (and, through `pallas_kernels.ops`,
reference vs kernel) for MLA (spec §2-§3).

dense : MHA mode. Per-head keys/values expanded from the latent; causal softmax over all
        earlier tokens. The training / dense warm-up / short-prefill path.
sparse: absorbed MQA mode + DSA. The indexer picks `index_topk` keys per query; queries are
        absorbed into the latent (q̂ = W_UKᵀ q_nope) and attend over the gathered 576-d rows
        [c_kv ; k_rope], values = c_kv; the 512-d result is expanded by W_UV. Memory O(T·k).
auto  : sparse when T > index_topk, else dense (identical there: top-k keeps every key).

Legend: B batch, T queries, S keys, H heads, N nope dim, R rope dim, C latent rank, V v dim,
K index top-k.
"""

import jax
import jax.numpy as jnp

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


def sparse_mla_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, indices, *, scale, nope_dim, chunk_size, impl="auto"):
    """Absorbed-mode attention over the selected rows; -> [B, T, H, V]."""
    dtype = q_nope.dtype
    kv_b = kv_b.astype(dtype)
    w_uk, w_uv = kv_b[..., :nope_dim], kv_b[..., nope_dim:]
    q_abs = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk, preferred_element_type=jnp.float32).astype(dtype)
    q = jnp.concatenate([q_abs, q_rope.astype(dtype)], axis=-1)
    kv = jnp.concatenate([c_kv, k_rope.astype(dtype)], axis=-1)
    o_latent = ops.sparse_mla(q, kv, indices, scale=scale, v_dim=c_kv.shape[-1], chunk_size=chunk_size, impl=impl)
    return jnp.einsum("BTHC,CHV->BTHV", o_latent, w_uv, preferred_element_type=jnp.float32).astype(dtype)


def mla_attention(q_nope, q_rope, c_kv, k_rope, kv_b, index_inputs, *, cfg, mode="auto"):
    """Returns (attention output [B, T, H, V], indexer indices [B, T, K] or None when dense)."""
    mode = resolve_mode(mode, q_nope.shape[1], cfg)
    scale, nope = cfg.softmax_scale, cfg.qk_nope_head_dim
    if mode == "dense":
        return dense_mha(q_nope, q_rope, c_kv, k_rope, kv_b, scale=scale, nope_dim=nope), None
    index_q, index_k, index_w, index_k_scale = index_inputs
    indices = ops.indexer_topk(index_q, index_k, index_w, k_scale=index_k_scale, topk=cfg.index_topk,
                               chunk_size=cfg.attention_chunk_size, impl=cfg.attention_impl)
    out = sparse_mla_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, indices, scale=scale, nope_dim=nope,
                              chunk_size=cfg.attention_chunk_size, impl=cfg.attention_impl)
    return out, indices
