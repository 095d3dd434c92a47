"""Pure-JAX sparse MLA attention in absorbed (MQA) mode (spec §2-§3): the kernels' reference.

out[b, t, h] = Σ_k softmax_k(scale · q[b, t, h] · kv[b, idx[b, t, k]]) · kv[b, idx[b, t, k], :v_dim]
over the selected rows only (idx = -1 slots are skipped). One shared KV row of Dqk = 576 dims
(latent 512 + RoPE 64) serves every head; the values are its first v_dim dims. Queries run in
chunks, each gathering only its own [Tc, K, Dqk] rows: memory O(T·K), never [T, S].

Decode (`sparse_mla_decode_reference`): the same function on one layer of the stacked cache
[L, B, S, Dqk]; the T·K selected rows are gathered out of the cache (not the whole layer) and
attended by `sparse_mla_reference`.

Shapes: L layers, B batch, T queries, S keys, H heads, D = Dqk, V = v_dim, K selected rows.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import map_query_chunks


def sparse_mla_reference(q, kv, indices, *, scale, v_dim=512, chunk_size=256):
    """[B, T, H, v_dim] in q's dtype; softmax in float32."""
    dtype = q.dtype

    def chunk(_, q_c, idx_c):
        rows = jax.vmap(lambda kv_b, i_b: kv_b[jnp.maximum(i_b, 0)])(kv, idx_c)  # [B, Tc, K, D]
        s = jnp.einsum("BTHD,BTKD->BTHK", q_c, rows, preferred_element_type=jnp.float32) * scale
        used = (idx_c >= 0)[:, :, None, :]
        s = jnp.where(used, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        out = jnp.einsum("BTHK,BTKV->BTHV", p.astype(dtype), rows[..., :v_dim],
                         preferred_element_type=jnp.float32)
        return out.astype(dtype)

    return map_query_chunks(chunk, chunk_size, q, indices)


def gather_decode_rows(kv_cache, layer, indices):
    """(rows [B, T·K, D], local indices [B, T, K]) of the selected rows of kv_cache[layer] ([L, B, S, D]):
    query t's rows sit at t·K .. t·K + K - 1 (-1 reads row 0 and stays -1). O(T·K) rows, no copy of the layer."""
    b, t, k = indices.shape
    batch = jnp.arange(b)[:, None, None]
    rows = kv_cache[layer, batch, jnp.maximum(indices, 0)].reshape(b, t * k, -1)
    local = jnp.where(indices >= 0, jnp.arange(t, dtype=jnp.int32)[:, None] * k + jnp.arange(k, dtype=jnp.int32), -1)
    return rows, local


def sparse_mla_decode_reference(q, kv_cache, layer, indices, *, scale, v_dim=512):
    """`sparse_mla_reference` of q [B, T, H, D] over kv_cache[layer] ([L, B, S, D]) -> [B, T, H, v_dim],
    on the gathered rows (`gather_decode_rows`)."""
    return sparse_mla_reference(q, *gather_decode_rows(kv_cache, layer, indices), scale=scale, v_dim=v_dim)
