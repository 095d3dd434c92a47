"""Pure-JAX lightning-indexer top-k (spec §3, steps 6-9): the reference for the kernels.

I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) over keys s <= t + q_offset and
s < k_len[b]; returns the indices of the `topk` largest per query, -1 where fewer valid keys
exist. Ties go to the lowest index (lax.top_k's order), the one canonical order for prefill,
decode and kernels (spec §11.12). Queries are scored in chunks: memory is
O(chunk · H · S + T · topk), never a [T, S] array of the whole sequence.

Shapes: B batch, T queries, S keys, H indexer heads, D indexer head dim, K = topk.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import map_query_chunks


def indexer_scores(q, k, w, k_scale=None):
    """Scores [B, T, S] (float32) of a block of queries against all keys."""
    logits = jnp.einsum("BTHD,BSD->BTHS", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jnp.einsum("BTHS,BTH->BTS", jax.nn.relu(logits), w.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, None, :]
    return scores


def valid_keys(positions, s, q_offset, k_len):
    """[B, Tc, S] mask of the keys a query may select: causal and inside k_len."""
    keys = jnp.arange(s, dtype=jnp.int32)
    causal = keys[None, :] <= positions[:, None] + q_offset
    return causal[None] & (keys[None, None, :] < k_len[:, None, None])


def indexer_topk_reference(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, chunk_size=256):
    """int32 indices [B, T, topk] of the highest indexer scores; -1 marks empty slots."""
    b, _, _, _ = q.shape
    s = k.shape[1]
    kk = min(topk, s)
    k_len = jnp.full((b,), s, jnp.int32) if k_len is None else jnp.asarray(k_len, jnp.int32)

    def chunk(positions, q_c, w_c):
        scores = indexer_scores(q_c, k, w_c, k_scale)
        valid = valid_keys(positions, s, q_offset, k_len)
        _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), kk)
        # top-k returns masked keys when fewer than kk are valid: re-apply the mask.
        chosen_valid = jnp.take_along_axis(valid, idx, axis=-1)
        return jnp.where(chosen_valid, idx, -1).astype(jnp.int32)

    idx = map_query_chunks(chunk, chunk_size, q, w)
    if kk < topk:
        idx = jnp.pad(idx, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)
    return idx
