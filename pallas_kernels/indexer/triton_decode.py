"""Decode lightning-indexer scores as a Pallas kernel with the Triton lowering (GPU), read from the stacked cache.

Same function as `pallas_kernels/indexer/reference.py` (spec §3, steps 6-9) for the decode shape:
few queries per sequence (T = 1, or 1 + drafts in speculative verification), a long cache and a
key limit per query. Query t of sequence b scores the keys s < k_len[b, t] of one layer:
I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[layer, b, s]) in float32.

The grid is (B, S / (blocks · block_s)). A program loads the T·H query rows of its sequence once,
then loops over its `blocks` key blocks: per block one [block_s, D] x [D, T·H] matmul (keys x
(query, head), so the head sum stays mostly within a thread; bf16, fp32 or fp8 e4m3 on Hopper's
fp8 wgmma, `triton_lowering`; fp32 accumulation), then ReLU, the weighted head sum and the key
scale, writing -inf where s >= k_len[b, t]. blocks = 1 (the default, the tiles measured below) is
one block per program; more blocks read q once per `blocks` key blocks (at H = 64, D = 128 bf16,
q is 16 KiB per 32 KiB key block, from L2) and give Triton's software pipelining (num_stages)
a loop in which to load the next key block while it computes this one.
Why it reads the cache itself:
- k_cache [L, B, S, D] and k_scale [L, B, S] come in whole (no BlockSpec) and the program loads
  its block at (layer, b, block) by pointer: XLA never slices the layer out, which would copy
  [B, S, D] before the kernel and double the HBM traffic of a memory-bound step. `layer` is an
  operand, so it may be traced (the model scans over layers). The last block's rows past S are
  masked loads, so S need not be a multiple of block_s (the cache is never padded either).
- A block wholly past every query's k_len is not read (the loop's traced trip count stops
  before it): its scores are -inf.
Scores are [B, T, Sp] float32 (Sp = S rounded up to blocks · block_s, padding -inf): O(S) per query,
little next to the keys at T ~ 1. `indexer_topk_decode_triton` selects each row's top-k with
`pallas_kernels.topk.select_topk` (same set as `lax.top_k`, lowest index first on ties, -1 past
the valid keys, listed by ascending index).

One exception: JAX's Triton lowering addresses an operand with 32-bit offsets (in elements)
unless it exceeds 4 GiB, so a 1-byte (fp8) operand of 2-4 GiB overflows the signed offset (an
fp8 cache of 3 layers at B = 64, S = 128K, D = 128: V3.2's dense-MLP layer group). Such a cache
is read from a copy of the layer (1/L of it); a single fp8 layer of 2-4 GiB is refused.

Target (perf_targets.md, B = 64, S = 128K, H = 64, D = 128): >= 70 % of HBM bandwidth over the
layer's key bytes. Measured on an H200 (jax 0.11.2, 2026-11-29, experiments/bench_kernels.py
--parts=decode, T = 1, L = 2): 1.68 ms with select_topk at block_s = 128, 4 warps (the fastest of
64-256 keys x 4-8 warps), 1.28 TB/s: 30 % of 4.3 TB/s, not met. The scores kernel alone takes
1.67 ms, so the kernel, not the top-k, is short of bandwidth; likely because a program loads one
[block_s, D] tile and has no other load in flight while it computes. The XLA reference on the
sliced layer: 12.5 ms. fp8 keys: 1.63 ms (1.28 ms for the scores), 1.39 ms with the top-k kernel.
Hence the key loop (blocks > 1, num_stages > 1), untimed: experiments/bench_kernels.py
--parts=decode sweeps it. The figures above predate the loop form; at blocks = 1 it compiles to
the same SASS length (496 instructions, 115 -> 120 registers, no spills; triton_static).

Shapes: L layers, B batch, T queries, S cache length, H heads, D head dim, K = topk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.indexer.mosaic_gpu_decode import indexer_scores_decode_mosaic_gpu
from pallas_kernels.tiles import next_pow2, overflows_offsets
from pallas_kernels.topk import select_topk
from pallas_kernels.topk_triton import select_topk_triton
from pallas_kernels.triton_lowering import use_fp8_wgmma


def _scores_kernel(layer_ref, klen_ref, q_ref, w_ref, k_ref, *rest, block_s, blocks, num_keys):
    """Grid (B, Sp / (blocks · block_s)): o_ref [Tp, blocks · block_s], the program's key blocks in a loop."""
    ks_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    tp, hp, d = q_ref.shape
    b, first = pl.program_id(0), pl.program_id(1) * (blocks * block_s)
    limit = klen_ref[...]  # [Tp]
    # The blocks some query sees (k_len <= S): the loop reads those, the rest are -inf, not read.
    visible = jnp.clip(jax.lax.div(jnp.max(limit) - first + block_s - 1, block_s), 0, blocks)
    layer = layer_ref[0]
    # Keys x (query, head), as the prefill kernel: the head sum stays mostly within a thread.
    q, w = q_ref[...].reshape(tp * hp, d), w_ref[...].reshape(1, tp * hp)

    def score_block(j, carry):
        start = pl.multiple_of(first + j * block_s, block_s)
        keys = start + jnp.arange(block_s, dtype=jnp.int32)
        rows = pl.ds(start, block_s)
        in_cache = None if num_keys % block_s == 0 else keys < num_keys  # only the last block has rows past S
        # Rows past S load nothing and no fill: their scores are replaced by -inf below (k_len <= S), and the
        # lowering cannot cast a fill to fp8.
        k = plgpu.load(k_ref.at[layer, b, rows, :], mask=None if in_cache is None else in_cache[:, None])
        logits = jnp.maximum(jnp.dot(k, q.T, preferred_element_type=jnp.float32), 0.0)
        scores = jnp.sum((logits * w).reshape(block_s, tp, hp), axis=2).T
        if ks_ref is not None:
            scores = scores * plgpu.load(ks_ref.at[layer, b, rows], mask=in_cache)[None, :]
        o_ref[:, pl.ds(pl.multiple_of(j * block_s, block_s), block_s)] = jnp.where(
            keys[None, :] < limit[:, None], scores, -jnp.inf)
        return carry

    def mask_block(j, carry):  # a block wholly past every query's k_len: not read
        o_ref[:, pl.ds(pl.multiple_of(j * block_s, block_s), block_s)] = jnp.full((tp, block_s), -jnp.inf,
                                                                                   jnp.float32)
        return carry

    jax.lax.fori_loop(0, visible, score_block, 0)
    jax.lax.fori_loop(visible, blocks, mask_block, 0)


def indexer_scores_decode_triton(q, k_cache, w, layer, k_len, k_scale=None, *, block_s=128, blocks=1, num_warps=4,
                                 num_stages=1, interpret=False):
    """Scores [B, Tp, Sp] float32 (-inf where s >= k_len[b, t] or s >= S) of q [B, T, H, D] against
    k_cache[layer] ([L, B, S, D], read in place); Tp, Sp: T and S rounded up to a power of two / blocks · block_s.
    blocks: key blocks per program, in a loop (module docstring).

    D must be a power of two >= 16: the keys are read as stored (padding D would copy the cache).
    """
    b, t, h, d = q.shape
    s = k_cache.shape[2]
    if d != next_pow2(d):
        raise ValueError(f"indexer_scores_decode_triton: head dim D must be a power of two >= 16 (the cache is read "
                         f"in place, unpadded), got {d}")
    if block_s != next_pow2(block_s):
        raise ValueError(f"indexer_scores_decode_triton: block_s must be a power of two >= 16, got {block_s}")
    if blocks < 1:
        raise ValueError(f"indexer_scores_decode_triton: blocks (key blocks per program) must be >= 1, got {blocks}")
    if overflows_offsets(k_cache.shape, k_cache.dtype):
        k_cache = jax.lax.dynamic_index_in_dim(k_cache, layer, keepdims=True)  # the copy the kernel avoids elsewhere
        k_scale = None if k_scale is None else jax.lax.dynamic_index_in_dim(k_scale, layer, keepdims=True)
        layer = 0
        if overflows_offsets(k_cache.shape, k_cache.dtype):
            raise ValueError(f"indexer_scores_decode_triton: one fp8 layer of {k_cache.size / 2**30:.1f} GiB: 2-4 GiB "
                             "1-byte operands overflow the Triton lowering's 32-bit offsets")
    span = blocks * block_s  # keys per program
    tp, hp, sp = next_pow2(t, 1), next_pow2(h), -(-s // span) * span
    # q, w and k_len are small: padded here (padded queries get k_len 0, padded heads weight 0).
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, hp - h), (0, 0)))
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, tp - t), (0, hp - h)))
    k_len = jnp.pad(jnp.clip(jnp.asarray(k_len, jnp.int32), 0, s), ((0, 0), (0, tp - t)))
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    in_specs = [
        pl.BlockSpec((1,), lambda i, j: (0,)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, tp, hp, d), lambda i, j: (i, 0, 0, 0)),
        pl.BlockSpec((None, tp, hp), lambda i, j: (i, 0, 0)),
        pl.no_block_spec,  # the whole stacked cache: the kernel loads (layer, b, block) itself
    ]
    args = [layer, k_len, q, w, k_cache]
    if k_scale is not None:
        in_specs.append(pl.no_block_spec)
        args.append(k_scale.astype(jnp.float32))
    name = "indexer_scores_decode"
    use_fp8_wgmma(name)  # fp8 q, k: Hopper's fp8 wgmma, not an f16 upcast (pallas_kernels/triton_lowering.py)
    return pl.pallas_call(
        functools.partial(_scores_kernel, block_s=block_s, blocks=blocks, num_keys=s),
        grid=(b, sp // span),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, tp, span), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((b, tp, sp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def indexer_topk_decode_triton(q, k_cache, w, layer, k_len, *, topk, k_scale=None, topk_kernel=False, interpret=False,
                               mosaic_gpu=False, **tiles):
    """Same contract as `indexer_topk_decode_reference`: int32 [B, T, topk], -1 for empty slots, indices ascending.

    topk_kernel: the top-k by `select_topk_triton` (one kernel) instead of `select_topk` (XLA); same result.
    mosaic_gpu: the scores by the Mosaic GPU kernel (`pallas_kernels/indexer/mosaic_gpu_decode.py`; untimed) instead;
    tiles: its block_s, blocks, num_stages.
    """
    t = q.shape[1]
    score = indexer_scores_decode_mosaic_gpu if mosaic_gpu else indexer_scores_decode_triton
    scores = score(q, k_cache, w, layer, k_len, k_scale, interpret=interpret, **tiles)
    # -inf scores (masked or padded keys) are never selected; -1 fills the slots past the valid keys.
    scores = scores[:, :t]
    return select_topk_triton(scores, topk, interpret=interpret) if topk_kernel else select_topk(scores, topk)
