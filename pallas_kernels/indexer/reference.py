"""Pure-JAX lightning-indexer top-k (spec §3, steps 6-9): the reference for the kernels.

I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) over keys s <= t + q_offset and
s < k_len[b] (or k_len[b, t], a limit per query); returns the indices of the `topk` largest per query, -1 where fewer valid keys
exist. Ties go to the lowest index (lax.top_k's order), the one canonical order for prefill,
decode and kernels (spec §11.12).

Memory is bounded: queries run in chunks of `chunk_size` and, within a chunk, keys stream in
blocks of `key_block` with a running top-k, so the working set is O(chunk · H · key_block +
chunk · topk) — never a [T, S] array. Only the blocks a chunk can see are scored (causality
halves the work). Ties stay canonical across blocks because the running set (all lower
indices, itself tie-ordered by index) is placed before each new block.

`indexer_topk_decode_reference` is the decode form (`ops.indexer_topk_decode`): the keys are one
layer of the stacked cache [L, B, S, D], each query with its own k_len[b, t] and no causal bound.

Shapes: B batch, T queries, S keys, H indexer heads, D indexer head dim, K = topk.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import map_query_chunks


def indexer_scores(q, k, w, k_scale=None):
    """Scores [B, Tq, Sk] (float32) of a block of queries against a block of keys."""
    logits = jnp.einsum("BTHD,BSD->BTHS", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jnp.einsum("BTHS,BTH->BTS", jax.nn.relu(logits), w.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, None, :]
    return scores


def indexer_topk_reference(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, chunk_size=256,
                           key_block=4096):
    """int32 indices [B, T, topk] of the highest indexer scores; -1 marks empty slots. k_len: [B] or [B, T]."""
    b, s = k.shape[0], k.shape[1]
    kk = min(topk, s)
    k_len = jnp.full((b,), s, jnp.int32) if k_len is None else jnp.minimum(jnp.asarray(k_len, jnp.int32), s)
    k_len = jnp.broadcast_to(k_len[:, None] if k_len.ndim == 1 else k_len, q.shape[:2])  # [B, T]: chunked with q
    block = min(key_block, s)
    n_blocks = -(-s // block)
    pad = n_blocks * block - s
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0)))
    scale = jnp.ones((b, s), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    scale = jnp.pad(scale, ((0, 0), (0, pad)))

    def chunk(positions, q_c, w_c, k_len_c):
        limit = jnp.minimum(positions[None, :] + q_offset + 1, k_len_c)[:, :, None]  # [B, Tc, 1]

        def step(i, carry):
            best_s, best_i = carry
            start = i * block
            keys = start + jnp.arange(block, dtype=jnp.int32)
            scores = indexer_scores(q_c, jax.lax.dynamic_slice_in_dim(k, start, block, axis=1), w_c,
                                    jax.lax.dynamic_slice_in_dim(scale, start, block, axis=1))
            scores = jnp.where(keys[None, None, :] < limit, scores, -jnp.inf)
            cand_s = jnp.concatenate([best_s, scores], axis=-1)
            cand_i = jnp.concatenate([best_i, jnp.broadcast_to(keys, scores.shape)], axis=-1)
            best_s, pos = jax.lax.top_k(cand_s, kk)
            return best_s, jnp.take_along_axis(cand_i, pos, axis=-1)

        init = (jnp.full(q_c.shape[:2] + (kk,), -jnp.inf, jnp.float32), jnp.full(q_c.shape[:2] + (kk,), -1, jnp.int32))
        visible = jnp.max(limit)  # blocks wholly past every query's last key are never scored
        _, idx = jax.lax.fori_loop(0, (visible + block - 1) // block, step, init)
        # top-k keeps masked keys when fewer than kk are valid: re-apply the mask after it.
        return jnp.where((idx >= 0) & (idx < limit), idx, -1)

    idx = map_query_chunks(chunk, chunk_size, q, w, k_len)
    if kk < topk:
        idx = jnp.pad(idx, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)
    return idx


def indexer_topk_decode_reference(q, k_cache, w, layer, k_len, *, topk, k_scale=None, key_block=4096):
    """int32 [B, T, topk]: query t of sequence b over the keys s < k_len[b, t] of k_cache[layer] [L, B, S, D]
    (k_scale [L, B, S] or None); -1 marks empty slots. Slices the layer out (a copy: the XLA baseline)."""
    s = k_cache.shape[2]
    scale = None if k_scale is None else k_scale[layer]
    # q_offset = S - 1 lifts the causal bound above every key: k_len alone limits each query.
    return indexer_topk_reference(q, k_cache[layer], w, topk=topk, k_scale=scale, q_offset=s - 1, k_len=k_len,
                                  key_block=key_block)
