"""Lightning-indexer scores as a Pallas kernel with the Mosaic lowering (TPU), top-k by chunks.

Same function as `pallas_kernels/indexer/reference.py` (spec §3, steps 6-9). The kernel scores
a block of `block_t` queries against a block of `block_s` keys:
I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) in float32 (one [block_t·H, D] x
[D, block_s] MXU matmul, then ReLU, the head weights and the head sum on the VPU), writing -inf
outside s <= t + q_offset and s < k_len. `indexer_topk_mosaic` runs it over chunks of
`chunk_size` queries and, within a chunk, over key blocks of `key_block` keys with a running
top-k merge. As in the reference, the running set (all lower indices) goes before each new
block, so ties keep the lowest index; the result lists indices ascending. Memory is
O(chunk_size · (key_block + topk)), never [T, S]; key blocks wholly after every query of the
chunk are never scored.

TPU-specific choices (why):
- The chunk's first query position, the key block's first key and k_len [B] are scalar-
  prefetched (SMEM), so the kernel masks by position and the key index_map can clamp a
  wholly-masked key block to the last visible one: Pallas skips the DMA when the block index
  does not change, and the kernel skips the matmul (`pl.when`).
- Block shapes keep the (8, 128) rule: q [block_t, H, D] and w [block_t, H, 1] (whole H, D, 1
  as the last two dims), keys [block_s, D], scales [1, block_s], scores [block_t, block_s]
  with block_t a multiple of 8 and block_s a multiple of 128 (the wrapper pads to them).
  w has a trailing unit dim so the head weights broadcast along lanes, not across them.
- The [block_t, H, D] -> [block_t·H, D] reshape merges whole (8, 128) tiles when H is a
  multiple of 8 (16 for bf16); V3.2's H = 64 is.
- FP8 (e4m3) q and k are widened to bf16 in VMEM, after the DMA (exact: every e4m3 value is a
  bf16), as the decode kernel does: TPU v4's Mosaic rejects an fp8 matmul outright, and no TPU
  before v7 has an fp8 MXU path (v5e/v5p/v6e compile one, converting it themselves).
- The merge is one stable XLA sort of (descending score key, index) pairs per key block
  (`selection="sort"`), not `select_topk`'s radix select (`selection="radix"`, the GPU
  indexers' choice). The radix select ends in element gathers (its compaction's binary search,
  the kept candidates), and a TPU gathers elements one at a time: XLA's TPU cost model prices
  one [512, 2048] element gather at 5.9 ms on v5e (2.6 ms on v6e), and a [512, 2048 + 8192]
  radix merge holds 36 of them, against 0.3 ms for the whole sort merge on v6e. The sort
  carries the indices as its second operand, so it gathers nothing. Its compiled program is
  also 3.9 MB instead of 41 MB (T = 16K on v5e; 13 s to compile instead of 47).

Not measured on a TPU (none here); run under `pltpu.InterpretParams` in the tests and compiled for
TPU v4, v5e, v5p and v6e by `experiments/tpu_aot.py` (libtpu, no TPU needed). The cost-model
figures above are XLA's estimates (`compiled.cost_analysis()["optimal_seconds"]`), not timings.

Shapes: B batch, T queries, S keys, H heads, D head dim, K = topk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunking import map_query_chunks
from pallas_kernels.topk import select_topk, sortable_key


def _limits(meta_ref, klen_ref, b, j, block_t, q_offset):
    """(first query position of block j, one past the last key the block's last query may see)."""
    first = meta_ref[0] + j * block_t
    return first, jnp.minimum(first + block_t + q_offset, klen_ref[b])


def _scores_kernel(meta_ref, klen_ref, q_ref, w_ref, k_ref, ks_ref, o_ref, *, q_offset):
    b, j, l = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_t, heads, dim = q_ref.shape
    block_s = k_ref.shape[0]
    first_pos, last_limit = _limits(meta_ref, klen_ref, b, j, block_t, q_offset)
    first_key = meta_ref[1] + l * block_s
    visible = first_key < last_limit

    @pl.when(visible)
    def _():
        q, k = q_ref[...].reshape(block_t * heads, dim), k_ref[...]
        if k.dtype == jnp.float8_e4m3fn:  # widened in VMEM (exact): Mosaic rejects an fp8 matmul on TPU v4
            q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = jnp.maximum(logits, 0.0).reshape(block_t, heads, block_s)
        scores = jnp.sum(logits * w_ref[...], axis=1) * ks_ref[...]  # [block_t, block_s]
        pos = first_pos + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 0)
        keys = first_key + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 1)
        limit = jnp.minimum(pos + q_offset + 1, klen_ref[b])
        o_ref[...] = jnp.where(keys < limit, scores, -jnp.inf)

    @pl.when(jnp.logical_not(visible))  # a block wholly after every query's last key: no matmul
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def indexer_scores_mosaic(q, k, w, k_scale, k_len, q_start, k_start, *, num_keys, q_offset=0, block_t=8,
                          block_s=512, interpret=False):
    """Scores [B, Tq, num_keys] (float32, -inf where masked) of queries q_start.. vs keys k_start...

    q [B, Tq, H, D] with Tq a multiple of block_t, w [B, Tq, H, 1] float32, k [B, Sp, D] and
    k_scale [B, 1, Sp] float32 with Sp a multiple of num_keys, num_keys a multiple of block_s.
    """
    b, tq, h, d = q.shape
    key_blocks = num_keys // block_s

    def key_block(b_, j, l, meta, klen):  # clamp wholly-masked blocks to the last visible one: no new DMA
        _, last_limit = _limits(meta, klen, b_, j, block_t, q_offset)
        last = jax.lax.div(jnp.maximum(last_limit - 1 - meta[1], 0), block_s)  # non-negative: plain division
        return jax.lax.div(meta[1], block_s) + jnp.minimum(l, last)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, tq // block_t, key_blocks),
        in_specs=[
            pl.BlockSpec((None, block_t, h, d), lambda b_, j, l, *_: (b_, j, 0, 0)),
            pl.BlockSpec((None, block_t, h, 1), lambda b_, j, l, *_: (b_, j, 0, 0)),
            pl.BlockSpec((None, block_s, d), lambda b_, j, l, *s: (b_, key_block(b_, j, l, *s), 0)),
            pl.BlockSpec((None, 1, block_s), lambda b_, j, l, *s: (b_, 0, key_block(b_, j, l, *s))),
        ],
        out_specs=pl.BlockSpec((None, block_t, block_s), lambda b_, j, l, *_: (b_, j, l)),
    )
    meta = jnp.stack([q_start, k_start]).astype(jnp.int32)
    return pl.pallas_call(
        functools.partial(_scores_kernel, q_offset=q_offset),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, tq, num_keys), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="indexer_scores",
    )(meta, k_len, q, w, k, k_scale)


SELECTIONS = ("sort", "radix")  # how the TPU indexers select: an XLA sort, or `select_topk`
# ~sortable_key(-inf), the descending key of a masked score: above every other (a negative float's is its bits).
_MASKED = np.array(-np.inf, np.float32).view(np.uint32)[()]


def _merge_by_sort(best, scores, cand_i, kk):
    """The kk largest of the running set (descending keys) and a new key block: one stable sort of (descending
    key, index) pairs; cand_i: the running set's indices, then the block's.

    Descending keys (~sortable_key) sort ascending in float total order reversed (+0.0 before -0.0, as
    lax.top_k), and the running set, sorted and of lower indices, goes first: so ties keep the lowest index.
    The indices travel as the sort's second operand: no gather (an element gather is slow on a TPU)."""
    cand = jnp.concatenate([best, ~sortable_key(scores)], axis=-1)
    cand, cand_i = jax.lax.sort((cand, cand_i), dimension=cand.ndim - 1, is_stable=True, num_keys=1)
    return cand[..., :kk], cand_i[..., :kk]


def _merge_by_radix(best, scores, cand_i, kk):
    """The same by `select_topk` (radix select, then gathers of the kept candidates), the running set as float32
    scores in ascending index order."""
    cand_s = jnp.concatenate([best, scores], axis=-1)
    pos = select_topk(cand_s, kk)  # ascending candidate position = ascending key index; -1: none
    kept, pos = pos >= 0, jnp.maximum(pos, 0)
    return (jnp.where(kept, jnp.take_along_axis(cand_s, pos, axis=-1), -jnp.inf),
            jnp.where(kept, jnp.take_along_axis(cand_i, pos, axis=-1), -1))


def indexer_topk_mosaic(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, chunk_size=512, key_block=8192,
                        block_t=8, block_s=512, selection="sort", interpret=False):
    """Same contract as `indexer_topk_reference`: int32 [B, T, topk], -1 for empty slots, indices ascending.

    selection: how each key block merges into the running top-k, "sort" (a stable sort of key-index
    pairs, XLA's TPU sort) or "radix" (`select_topk`); the same indices either way.
    """
    check_selection("indexer_topk_mosaic", selection)
    b, s = k.shape[0], k.shape[1]
    kk = min(topk, s)
    k_len = jnp.full((b,), s, jnp.int32) if k_len is None else jnp.minimum(jnp.asarray(k_len, jnp.int32), s)
    k_scale = jnp.ones((b, s), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    block_s = min(block_s, -(-s // 128) * 128)
    key_block = -(-min(key_block, s) // block_s) * block_s
    sp = -(-s // key_block) * key_block
    # Padded once for all chunks; padded keys sit at s >= k_len, so they are always masked.
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0)))
    k_scale = jnp.pad(k_scale, ((0, 0), (0, sp - s)))[:, None, :]

    # The running set's value for an empty slot, and its merge.
    masked, merge = (_MASKED, _merge_by_sort) if selection == "sort" else (np.float32(-np.inf), _merge_by_radix)

    def chunk(positions, q_c, w_c):
        tc = q_c.shape[1]
        tp = -(-tc // block_t) * block_t
        q_c = jnp.pad(q_c, ((0, 0), (0, tp - tc), (0, 0), (0, 0)))
        w_c = jnp.pad(w_c.astype(jnp.float32), ((0, 0), (0, tp - tc), (0, 0)))[..., None]
        q_start = positions[0]

        def step(i, carry):
            best, best_i = carry
            k_start = i * key_block
            scores = indexer_scores_mosaic(q_c, k, w_c, k_scale, k_len, q_start, k_start, num_keys=key_block,
                                           q_offset=q_offset, block_t=block_t, block_s=block_s,
                                           interpret=interpret)[:, :tc]
            keys = k_start + jnp.arange(key_block, dtype=jnp.int32)
            cand_i = jnp.concatenate([best_i, jnp.broadcast_to(keys, scores.shape)], axis=-1)
            return merge(best, scores, cand_i, kk)

        visible = jnp.minimum(q_start + tc + q_offset, jnp.max(k_len))  # keys any query of the chunk can see
        init = (jnp.full((b, tc, kk), masked, masked.dtype), jnp.full((b, tc, kk), -1, jnp.int32))
        best, best_i = jax.lax.fori_loop(0, (visible + key_block - 1) // key_block, step, init)
        idx = jnp.where(best != masked, best_i, -1)
        # The sort leaves them by descending score: listed ascending (the kernels' order), -1s last. The radix
        # merge keeps candidate order, which is index order.
        return ascending_indices(idx) if selection == "sort" else idx

    idx = map_query_chunks(chunk, chunk_size, q, w)
    if kk < topk:
        idx = jnp.pad(idx, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)
    return idx


def check_selection(name, selection):
    if selection not in SELECTIONS:
        raise ValueError(f"{name}: selection must be one of {SELECTIONS}, got {selection!r}")


def ascending_indices(idx):
    """Each row's indices in increasing order, its -1s last."""
    big = jnp.iinfo(jnp.int32).max
    idx = jnp.sort(jnp.where(idx >= 0, idx, big), axis=-1)
    return jnp.where(idx == big, -1, idx)
