"""Lightning-indexer scores as a Pallas kernel with the Triton lowering (GPU), top-k by chunks.

The kernel computes, for a block of `block_t` queries against a block of `block_s` keys,
I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) in float32 (one [block_s, D] x
[D, block_t·H] matmul, ReLU, a weighted head sum: `_score_tile`), writing -inf outside
s <= t + q_offset and s < k_len. q and k may be bf16, fp32 or FP8 e4m3 (Hopper's fp8 wgmma,
`pallas_kernels/triton_lowering.py`; the per-key scale comes in as k_scale and q's is folded into
w by the caller). `indexer_topk_triton` runs it over chunks of `chunk_size` queries and selects
each chunk's top-k with the Triton kernel `select_topk_triton` (default) or with
`pallas_kernels.topk.select_topk` (radix select in XLA, `topk_kernel=False`): the same set as
`lax.top_k`, lowest index first on ties, listed by ascending index. Memory is O(chunk_size · S),
never [T, S]. Causal queries run in up to `segments` runs of whole chunks (`chunking.causal_segments`),
each against only the keys its last query sees: at T = S and 8 runs the scores grid, the scores
written and the rows top-k reads are 56 % of T x S (the grid kernel's causal no-op programs and
the top-k's reads of -inf columns were the rest).
Reference: `pallas_kernels/indexer/reference.py`.

JAX's Triton lowering addresses an operand with 32-bit signed element offsets unless it exceeds
4 GiB, which a 1-byte (fp8) operand of 2^31-2^32 elements overflows (`pallas_kernels/tiles.py`):
an fp8 k [B, S, D] of 2-4 GiB (B = 192, S = 128K, D = 128) or a query chunk [B, chunk_size, H, D]
(B > 512 at chunk_size 512, H = 64, D = 128). There `indexer_topk_triton` runs the batch in even
groups of rows whose operands stay within 2^31 elements (each group's k a copy, one group at a
time; q is sliced per chunk as before); a single row in that range (S·D > 2^31) is refused with
a ValueError. Not affected: the float32 and int32 operands (k_scale, w, scores) and select_topk
(plain XLA, no Triton call).

Measured on an H200 (jax 0.11.2, 2026-11-29; V3.2: 64 heads x 128, k=2048, bf16, 8 causal runs,
experiments/bench_kernels.py): the key-loop kernel (2:128 tiles, 8 warps, 2 stages) 10.8 ms at
T = 16K and 103.5 ms at 64K, the grid kernel's best tiles (4:128) 14.2 and 156.3 ms (1.3x / 1.5x
slower); with the top-k kernel for select_topk 7.8 and 88.7 ms (1.41x / 1.17x faster); fp8 q and
k 83.7 ms at 64K (select_topk); the XLA reference 150 ms at 16K; one run instead of 8 causal
runs 1.13x / 1.08x slower. Hence the defaults: key loop, block_t = 2, top-k kernel. Target at
64K: 60 ms, not met. Earlier runs (grid kernel, one run): 3.1 / 47 / 697 ms at 4K / 16K / 64K
with `lax.top_k` (2.7 ms per [512, 64K] chunk), 22.1 / 265 ms at 16K / 64K with `select_topk`.

Two kernels compute the same tiles (`_score_tile`, so the scores are bitwise equal):
- the grid kernel (`key_loop=False`): grid (B, Tp/block_t, Sp/block_s), one tile per program. At
  block_t = 4, block_s = 128 (H = 64, D = 128, bf16) a program loads a q tile
  [256, 128] (64 KiB) and a key tile (32 KiB), does one 256 x 128 x 128 matmul (8.4 MFLOP) and
  writes 2 KiB: ~84 FLOP/B, below the H200's bf16 ridge (~790 TFLOP/s / 4.3 TB/s ~ 180), because
  q is read again for every key block (275 GB of q reads at T = S = 64K, mostly from L2). And
  there are 16K x 512 = 8.4M programs, half of them causal no-ops that still launch and store -inf.
- the key-loop kernel (default, flash-attention style): grid (B, Tp/block_t); a program
  loads its q tile and w once, then loops (`lax.fori_loop`, lowered to an scf.for with the trip
  count computed in the kernel from the positions, q_offset and k_len) over the key blocks its
  queries see, loading each key tile and its scales with `pl.ds` from the batch row's [Sp, Dp]
  block and storing the tile into its [block_t, Sp] output rows; a second loop stores -inf in the
  blocks past the limit (no load, no matmul). Per iteration: the key tile + 2 KiB out for the same
  8.4 MFLOP at block_t = 4, ~240 FLOP/B; q is read once (1 GB at 64K), 16K programs.
  experiments/bench_kernels.py sweeps both (configs ending in ":loop"); timings above.

Shapes: B batch, T queries, S keys, H heads, D head dim, K = topk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunking import causal_segments, map_chunks, map_query_chunks
from pallas_kernels.indexer.mosaic_gpu import indexer_scores_mosaic_gpu
from pallas_kernels.tiles import next_pow2, rows_per_call
from pallas_kernels.topk import select_topk
from pallas_kernels.topk_triton import select_topk_triton
from pallas_kernels.triton_lowering import use_fp8_wgmma

BLOCK_T, BLOCK_S = 2, 128  # default tiles: queries x keys per program (the fastest key-loop tiles on an H200)


def _score_tile(q, w, k, k_scale, keys, limit):
    """One [block_t, block_s] tile: k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]), -inf where keys[s] >= limit[t].

    q [block_t, Hp, Dp], w [block_t, Hp], k [block_s, Dp], k_scale [block_s], keys [block_s], limit [block_t].
    Both kernels call it, so the key loop computes each tile exactly as the grid does.
    The logits are computed transposed, keys x (query, head) = k · qᵀ, so the head sum runs along
    the accumulator's columns, which the MMA layout keeps mostly within a thread (DeepGEMM's
    orientation). With queries x heads on the rows (q · kᵀ) the sum crossed lanes: compiled for
    sm_90a at the default tile, 320 warp shuffles and 320 adds per thread per tile against 16 and
    72 now, 1504 -> 656 SASS instructions, 244 -> 186 registers (`experiments/triton_static.py`).
    """
    block_t, heads, dim = q.shape
    block_s = k.shape[0]
    logits = jnp.maximum(jnp.dot(k, q.reshape(block_t * heads, dim).T, preferred_element_type=jnp.float32), 0.0)
    scores = jnp.sum((logits * w.reshape(1, block_t * heads)).reshape(block_s, block_t, heads), axis=2).T
    return jnp.where(keys[None, :] < limit[:, None], scores * k_scale[None, :], -jnp.inf)


def _key_limit(pos_ref, klen_ref, q_offset):
    """[block_t]: query t sees the keys s < min(position + q_offset + 1, k_len) (padded queries: none)."""
    return jnp.minimum(pos_ref[...] + q_offset + 1, klen_ref[0])


def _scores_kernel(pos_ref, q_ref, w_ref, k_ref, ks_ref, klen_ref, o_ref, *, block_s, q_offset):
    """Grid (B, Tp/block_t, Sp/block_s): one tile per program."""
    block_t = q_ref.shape[0]
    first = pl.program_id(2) * block_s
    limit = _key_limit(pos_ref, klen_ref, q_offset)
    visible = first < jnp.max(limit)

    @pl.when(visible)
    def _():
        keys = first + jnp.arange(block_s, dtype=jnp.int32)
        o_ref[...] = _score_tile(q_ref[...], w_ref[...], k_ref[...], ks_ref[...], keys, limit)

    @pl.when(jnp.logical_not(visible))  # a block wholly after every query's last key: no matmul
    def _():
        o_ref[...] = jnp.full((block_t, block_s), -jnp.inf, jnp.float32)


def _scores_key_loop_kernel(pos_ref, q_ref, w_ref, k_ref, ks_ref, klen_ref, o_ref, *, block_s, q_offset):
    """Grid (B, Tp/block_t): the program loops over the key blocks of its batch row (k_ref [Sp, Dp], o_ref
    [block_t, Sp]), q and w loaded once; the trip count is the blocks its queries see (traced), the rest get -inf."""
    block_t = q_ref.shape[0]
    num_blocks = k_ref.shape[0] // block_s
    limit = _key_limit(pos_ref, klen_ref, q_offset)
    # limit <= k_len <= S, so at most num_blocks; padded-only tiles have max(limit) = 0: no block.
    visible = jax.lax.div(jnp.maximum(jnp.max(limit), 0) + block_s - 1, block_s)
    q, w = q_ref[...], w_ref[...]

    def score_block(j, carry):
        first = pl.multiple_of(j * block_s, block_s)
        rows = pl.ds(first, block_s)
        keys = first + jnp.arange(block_s, dtype=jnp.int32)
        o_ref[:, rows] = _score_tile(q, w, k_ref[rows, :], ks_ref[rows], keys, limit)
        return carry

    def mask_block(j, carry):  # a block wholly after every query's last key: no load, no matmul
        o_ref[:, pl.ds(pl.multiple_of(j * block_s, block_s), block_s)] = jnp.full((block_t, block_s), -jnp.inf,
                                                                                   jnp.float32)
        return carry

    jax.lax.fori_loop(0, visible, score_block, 0)
    jax.lax.fori_loop(visible, num_blocks, mask_block, 0)


def _padded_dims(tc, s, h, d, block_t, block_s):
    """(Tp, Sp, Hp, Dp): the kernel's query-chunk, key, head and head-dim sizes after padding."""
    return -(-tc // block_t) * block_t, -(-s // block_s) * block_s, next_pow2(h), next_pow2(d)


def _row_operands(q, k, tc, block_t, block_s):
    """One batch row of each kernel operand that may be 1-byte (a query chunk of tc, the keys), padded."""
    tp, sp, hp, dp = _padded_dims(tc, k.shape[1], q.shape[2], q.shape[3], block_t, block_s)
    return {"the query chunk q [Tp, Hp, Dp]": ((tp, hp, dp), q.dtype), "the keys k [Sp, Dp]": ((sp, dp), k.dtype)}


def indexer_scores_triton(q, k, w, k_scale, k_len, positions, *, q_offset=0, block_t=BLOCK_T, block_s=BLOCK_S,
                          key_loop=True, num_warps=8, num_stages=2, interpret=False):
    """Scores [B, Tc, S] (float32, -inf where masked) of queries at `positions` [Tc].

    key_loop: the key-loop kernel (one program per query tile looping over the key blocks) instead of
    the grid kernel (one program per tile); same scores (module docstring).
    """
    b, tc, h, d = q.shape
    s = k.shape[1]
    if rows_per_call(b, _row_operands(q, k, tc, block_t, block_s), "indexer_scores_triton") < b:
        raise ValueError(f"indexer_scores_triton: q {q.shape} / k {k.shape} of {q.dtype} / {k.dtype}: a 1-byte operand "
                         "of 2^31-2^32 elements overflows the Triton lowering's 32-bit offsets; pass fewer batch rows "
                         "(indexer_topk_triton splits the batch)")
    tp, sp, hp, dp = _padded_dims(tc, s, h, d, block_t, block_s)
    q = jnp.pad(q, ((0, 0), (0, tp - tc), (0, hp - h), (0, dp - d)))
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, tp - tc), (0, hp - h)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, dp - d)))
    k_scale = jnp.pad(k_scale.astype(jnp.float32), ((0, 0), (0, sp - s)))
    positions = jnp.pad(positions.astype(jnp.int32), (0, tp - tc), constant_values=-1 - q_offset)
    # The key-loop program takes all Sp keys of its batch row (and its [block_t, Sp] output rows) as one block.
    key_tile, grid = (sp, (b, tp // block_t)) if key_loop else (block_s, (b, tp // block_t, sp // block_s))
    key_block = lambda *l: l[0] if l else 0  # the block index along S: l on the 3-D grid, else 0
    in_specs = [
        pl.BlockSpec((block_t,), lambda i, j, *l: (j,)),
        pl.BlockSpec((None, block_t, hp, dp), lambda i, j, *l: (i, j, 0, 0)),
        pl.BlockSpec((None, block_t, hp), lambda i, j, *l: (i, j, 0)),
        pl.BlockSpec((None, key_tile, dp), lambda i, j, *l: (i, key_block(*l), 0)),
        pl.BlockSpec((None, key_tile), lambda i, j, *l: (i, key_block(*l))),
        pl.BlockSpec((1,), lambda i, j, *l: (i,)),
    ]
    name = "indexer_scores_key_loop" if key_loop else "indexer_scores"
    use_fp8_wgmma(name)  # fp8 q, k: Hopper's fp8 wgmma, not an f16 upcast (pallas_kernels/triton_lowering.py)
    out = pl.pallas_call(
        functools.partial(_scores_key_loop_kernel if key_loop else _scores_kernel, block_s=block_s, q_offset=q_offset),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_t, key_tile), lambda i, j, *l: (i, j, key_block(*l))),
        out_shape=jax.ShapeDtypeStruct((b, tp, sp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(positions, q, w, k, k_scale, k_len.astype(jnp.int32))
    return out[:, :tc, :s]


def indexer_topk_triton(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, chunk_size=512, segments=8,
                        topk_kernel=True, interpret=False, block_t=BLOCK_T, block_s=BLOCK_S, key_loop=True,
                        mosaic_gpu=False, **tiles):
    """Same contract as `indexer_topk_reference` (int32 [B, T, topk], -1 for empty slots), indices ascending.

    segments: the queries run in up to this many causal runs (`chunking.causal_segments`), each
    scored and top-k'd against only the keys its last query sees (1: every chunk against the keys
    of the last query, min(S, T + q_offset)).
    topk_kernel: each chunk's top-k by `select_topk_triton` (one kernel, a program per row; default) or by
    `select_topk` (XLA); the same indices in the same order.
    key_loop: score with the key-loop kernel (default) or the grid kernel (`indexer_scores_triton`); tiles: its
    num_warps, num_stages.
    mosaic_gpu: score with the Mosaic GPU kernel instead (`pallas_kernels/indexer/mosaic_gpu.py`: bf16/f16 or fp8
    q and k, Hopper; untimed); tiles: its num_stages; key_loop is not used.
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    k_len = jnp.full((b,), s, jnp.int32) if k_len is None else jnp.minimum(jnp.asarray(k_len, jnp.int32), s)
    k_scale = jnp.ones((b, s), jnp.float32) if k_scale is None else k_scale

    def run(start, stop, width):
        q_r, w_r = q[:, start:stop], w[:, start:stop]
        k_r, k_scale_r, k_len_r = k[:, :width], k_scale[:, :width], jnp.minimum(k_len, width)
        # All B rows per kernel call unless an fp8 operand of 2-4 GiB would be mis-addressed (module docstring).
        group = rows_per_call(b, _row_operands(q_r, k_r, min(chunk_size, stop - start), block_t, block_s),
                              "indexer_topk_triton")

        def batch_rows(rows, k, k_scale, k_len):  # rows [G]: the batch rows of this group, k... sliced to them
            def chunk(positions, q_c, w_c):
                # The group's rows of the query chunk: XLA folds this slice into the chunk's (one copy of [G, Tc, ...]).
                q_c, w_c = (jax.lax.dynamic_slice_in_dim(x, rows[0], rows.shape[0]) for x in (q_c, w_c))
                score = (indexer_scores_mosaic_gpu if mosaic_gpu
                         else functools.partial(indexer_scores_triton, key_loop=key_loop))
                scores = score(q_c, k, w_c, k_scale, k_len, start + positions, q_offset=q_offset, block_t=block_t,
                               block_s=block_s, interpret=interpret, **tiles)
                # Masked scores are -inf: never selected, -1 past the valid keys.
                return (select_topk_triton(scores, topk, interpret=interpret) if topk_kernel
                        else select_topk(scores, topk))

            return map_query_chunks(chunk, chunk_size, q_r, w_r)

        return map_chunks(batch_rows, group, k_r, k_scale_r, k_len_r, axis=0)

    runs = causal_segments(t, s, chunk_size, segments, q_offset)
    return jnp.concatenate([run(*r) for r in runs], axis=1) if len(runs) > 1 else run(*runs[0])
