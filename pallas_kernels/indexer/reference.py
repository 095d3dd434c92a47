"""Pure-JAX lightning-indexer top-k (spec §3, steps 6-9): the reference for the kernels.

I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) over keys s <= t + q_offset and
s < k_len[b]; returns the indices of the `topk` largest per query, -1 where fewer valid keys
exist. Ties go to the lowest index (lax.top_k's order), the one canonical order for prefill,
decode and kernels (spec §11.12).

Memory is bounded: queries run in chunks of `chunk_size` and, within a chunk, keys stream in
blocks of `key_block` with a running top-k, so the working set is O(chunk · H · key_block +
chunk · topk) — never a [T, S] array. Ties stay canonical across blocks because the running
set (all lower indices, itself tie-ordered by index) is placed before each new block.

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
    """int32 indices [B, T, topk] of the highest indexer scores; -1 marks empty slots."""
    b, s = k.shape[0], k.shape[1]
    kk = min(topk, s)
    k_len = jnp.full((b,), s, jnp.int32) if k_len is None else jnp.minimum(jnp.asarray(k_len, jnp.int32), s)
    block = min(key_block, s)
    n_blocks = -(-s // block)
    pad = n_blocks * block - s
    k_blocks = jnp.pad(k, ((0, 0), (0, pad), (0, 0))).reshape(b, n_blocks, block, -1).swapaxes(0, 1)
    scale = jnp.ones((b, s), jnp.float32) if k_scale is None else k_scale
    scale_blocks = jnp.pad(scale, ((0, 0), (0, pad))).reshape(b, n_blocks, block).swapaxes(0, 1)

    def chunk(positions, q_c, w_c):
        limit = jnp.minimum(positions[None, :] + q_offset + 1, k_len[:, None])[:, :, None]  # [B, Tc, 1]

        def step(carry, blk):
            best_s, best_i = carry
            k_blk, scale_blk, start = blk
            keys = start + jnp.arange(block, dtype=jnp.int32)
            scores = indexer_scores(q_c, k_blk, w_c, scale_blk)
            scores = jnp.where(keys[None, None, :] < limit, scores, -jnp.inf)
            cand_s = jnp.concatenate([best_s, scores], axis=-1)
            cand_i = jnp.concatenate([best_i, jnp.broadcast_to(keys, scores.shape)], axis=-1)
            best_s, pos = jax.lax.top_k(cand_s, kk)
            return (best_s, jnp.take_along_axis(cand_i, pos, axis=-1)), None

        init = (jnp.full(q_c.shape[:2] + (kk,), -jnp.inf, jnp.float32), jnp.full(q_c.shape[:2] + (kk,), -1, jnp.int32))
        starts = jnp.arange(n_blocks, dtype=jnp.int32) * block
        (_, idx), _ = jax.lax.scan(step, init, (k_blocks, scale_blocks, starts))
        # top-k keeps masked keys when fewer than kk are valid: re-apply the mask after it.
        return jnp.where((idx >= 0) & (idx < limit), idx, -1)

    idx = map_query_chunks(chunk, chunk_size, q, w)
    if kk < topk:
        idx = jnp.pad(idx, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)
    return idx
