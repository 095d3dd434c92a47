"""Decode sparse MLA attention as a Pallas kernel with the Triton lowering (GPU), reading the selected rows
straight from the stacked cache.

Same function as `pallas_kernels/sparse_mla/reference.py::sparse_mla_decode_reference` (spec §2-§3,
absorbed MQA mode) for the decode shape: T queries per sequence (1, or 1 + drafts in speculative
verification), each over its own K selected rows of one layer of the cache [L, B, S, Dqk].

Grid (B·T, H / block_h, num_splits). A program takes block_h heads of one query, which share every
selected row, and walks its share of the query's K indices in blocks of block_k rows with the
online softmax of the prefill kernel (`triton.attend_blocks`): the same per-block math.
Why it reads the cache itself:
- kv_cache [L, B, S, D] comes in whole (no BlockSpec) and each block of rows is loaded by pointer
  from (layer, b, index): XLA never gathers the rows into a [B, T·K, D] array (written and read
  back: ~2x the row bytes the attention must read) nor slices the layer out. `layer` is an
  operand, so it may be traced (the model scans over layers).
- The row's latent [:V] and RoPE [V:] parts are two loads of power-of-two widths (Triton's tile
  rule), masked past V and D when those are not powers of two (tiny test configs; at V3.2, 512 and
  64, no column mask). q and the output are read and written by pointer in the same way, so no
  padded copy of q, of the cache or of the output is made. Unused slots (-1) load nothing. By
  default a program walks all its split's index blocks; walk_all=False stops at the query's last
  used slot (`blocks.py`: a sequence shorter than K keys), untimed (below).
- num_splits > 1 splits each query's K rows over that many programs (split-K), each writing a
  float32 partial output and its log-sum-exp; XLA combines the [B, T, splits, H, V] partials
  (`combine_splits`). For when B·T·H/block_h programs are too few to fill the GPU's SMs (132 on
  an H200; FlashMLA's split-KV lesson, perf_targets.md §1). 1 = no split: the output is written
  in q's dtype directly.
- JAX's Triton lowering addresses an operand with 32-bit element offsets unless it exceeds 4 GiB;
  the overflow of indexer/triton_decode.py (1-byte elements, 2-4 GiB) cannot happen here: the
  cache is bf16 or float32 (checked), so an operand of at most 4 GiB has fewer than 2^31 elements.

Tiles (block_h heads x block_k rows): the float32 accumulator [block_h, V] lives in registers,
the row block [block_k, D] in shared memory. Default 32 x 64, 4 warps, no split: the fastest of
the sweep on an H200 (jax 0.11.2, 2026-11-29; B = 64, S = 128K, T = 1, H = 128, K = 2048, bf16;
experiments/bench_kernels.py --parts=decode_mla): 0.37 ms, 456 GB/s of the rows that must be read
(12 % of HBM bandwidth), against 0.44 ms for 64 x 32 x 8 warps, 0.47 ms for 32 x 64 x 8 warps and
0.44 ms for 32 x 64 x 4 warps with 2 splits; the old path (XLA gather, then the prefill kernel)
0.57 ms, the XLA reference 0.64 ms; max abs error 2e-3 against the reference in every tile.
Offline (experiments/triton_static.py, pip triton 3.9, XLA's TTIR passes) the 64-head tile runs
on wgmma in 255 registers without spills and the 32-head one on mma.sync, spilling 32 B: the
static figures did not predict the order. 256 programs at these shapes (2 per SM on 132 SMs).

Shapes: L layers, B batch, T queries, S cache rows, H heads, D = Dqk, V = v_dim, R = D - V,
K selected rows per query, P = num_splits.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_mla.blocks import walked_blocks
from pallas_kernels.sparse_mla.triton import attend_blocks, normalize
from pallas_kernels.tiles import next_pow2


def _decode_kernel(layer_ref, idx_ref, q_ref, kv_ref, o_ref, lse_ref, *, scale, v_dim, queries, block_h, block_k,
                   blocks_per_split, walk_all):
    heads_total, d = q_ref.shape[1], q_ref.shape[2]
    i, split = pl.program_id(0), pl.program_id(2)
    b, layer = i // queries, layer_ref[0]
    heads = pl.program_id(1) * block_h + jnp.arange(block_h, dtype=jnp.int32)
    head_mask = None if heads_total % block_h == 0 else heads < heads_total
    vp, rp = next_pow2(v_dim), next_pow2(d - v_dim)
    cols_n, cols_r = jnp.arange(vp, dtype=jnp.int32), v_dim + jnp.arange(rp, dtype=jnp.int32)
    # Column masks only where a power-of-two width overhangs the part (V, D - V not powers of two).
    mask_n = None if vp == v_dim else (cols_n < v_dim)[None, :]
    mask_r = None if v_dim + rp == d else (cols_r < d)[None, :]

    def mask(rows_ok, col_ok):
        if rows_ok is None:
            return col_ok
        return rows_ok[:, None] if col_ok is None else rows_ok[:, None] & col_ok

    def load(ref_at, m):
        return plgpu.load(ref_at, mask=m, other=None if m is None else 0)

    q_rows = heads[:, None]
    qn = load(q_ref.at[i, q_rows, cols_n[None, :]], mask(head_mask, mask_n))
    qr = load(q_ref.at[i, q_rows, cols_r[None, :]], mask(head_mask, mask_r))

    def gather(rows, used):
        rows = rows[:, None]
        return (load(kv_ref.at[layer, b, rows, cols_n[None, :]], mask(used, mask_n)),
                load(kv_ref.at[layer, b, rows, cols_r[None, :]], mask(used, mask_r)))

    # This split's blocks up to the query's last used slot (`blocks.py`), or (walk_all) all of them.
    first = split * blocks_per_split
    num_blocks = (blocks_per_split if walk_all
                  else jnp.clip(walked_blocks(idx_ref[...] >= 0, block_k) - first, 0, blocks_per_split))
    out, lse = normalize(*attend_blocks(idx_ref, qn, qr, gather, scale=scale, block_k=block_k, first_block=first,
                                        num_blocks=num_blocks))
    plgpu.store(o_ref.at[i, split, q_rows, cols_n[None, :]], out.astype(o_ref.dtype), mask=mask(head_mask, mask_n))
    plgpu.store(lse_ref.at[i, split, heads], lse, mask=head_mask)


def combine_splits(out, lse, dtype):
    """Partials out [B, T, P, H, V] float32 and lse [B, T, P, H] of P disjoint row sets -> [B, T, H, V] in dtype.

    Each split's output is weighted by its share exp(lse_p - max lse) of the softmax mass; a query
    that selected nothing (every lse -inf) gives zeros.
    """
    top = jnp.max(lse, axis=2, keepdims=True)
    weight = jnp.exp(lse - jnp.where(top == -jnp.inf, 0.0, top))  # [B, T, P, H]; 0 for an empty split
    total = jnp.sum(weight, axis=2)
    combined = jnp.einsum("BTPH,BTPHV->BTHV", weight, out) / jnp.where(total > 0, total, 1.0)[..., None]
    return combined.astype(dtype)


def sparse_mla_decode_triton(q, kv_cache, layer, indices, *, scale, v_dim=512, block_h=32, block_k=64, num_warps=4,
                             num_stages=2, num_splits=1, walk_all=True, interpret=False):
    """Same contract as `sparse_mla_decode_reference`: q [B, T, H, D], kv_cache [L, B, S, D] (bf16 or float32,
    read in place), layer int32 scalar (may be traced), indices [B, T, K] -> [B, T, H, v_dim] in q's dtype.

    walk_all: walk every index block of a split (a static trip count; the measured form), or
    (False) only those up to the query's last used slot (same output; `blocks.py`), which skips
    most of the work of a sequence shorter than K keys. Compiled offline
    (experiments/triton_static.py, 2026-11-30), the data-dependent trip count spills 232 B at the
    default tile, 29 spill accesses in the loop, against 32 B and 4 with the static one: it may
    cost long contexts (every block used), where decode attention costs most, more than it saves
    short ones. Hence off until timed: bench_kernels sweeps both (":used").
    """
    b, t, h, d = q.shape
    k = indices.shape[-1]
    if kv_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"sparse_mla_decode_triton: kv_cache dtype must be bfloat16 or float32, got {kv_cache.dtype}")
    for name, value in (("block_h", block_h), ("block_k", block_k)):
        if value != next_pow2(value):
            raise ValueError(f"sparse_mla_decode_triton: {name} must be a power of two >= 16, got {value}")
    if num_splits < 1:
        raise ValueError(f"sparse_mla_decode_triton: num_splits must be >= 1, got {num_splits}")
    block_h = min(block_h, next_pow2(h))
    blocks_per_split = -(-k // (block_k * num_splits))
    # Whole blocks for every split, and a power of two of slots (a program loads the row to count its walk; the Triton
    # lowering's arrays are powers of two). Blocks past the splits' are -1 and never walked.
    kp = next_pow2(blocks_per_split * num_splits * block_k)
    # Only the indices are padded (-1: unused), a few bytes per selected row.
    idx = jnp.pad(indices.astype(jnp.int32).reshape(b * t, k), ((0, 0), (0, kp - k)), constant_values=-1)
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(_decode_kernel, scale=scale, v_dim=v_dim, queries=t, block_h=block_h,
                               block_k=block_k, blocks_per_split=blocks_per_split, walk_all=walk_all)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b * t, -(-h // block_h), num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, p: (0,)),
            pl.BlockSpec((None, kp), lambda i, j, p: (i, 0)),
            pl.no_block_spec,  # q [B·T, H, D]: the kernel loads its heads' latent and RoPE parts
            pl.no_block_spec,  # the whole stacked cache: the kernel loads the rows (layer, b, index) itself
        ],
        out_specs=[pl.no_block_spec, pl.no_block_spec],
        out_shape=[jax.ShapeDtypeStruct((b * t, num_splits, h, v_dim), out_dtype),
                   jax.ShapeDtypeStruct((b * t, num_splits, h), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_mla_decode",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), idx, q.reshape(b * t, h, d), kv_cache)
    if num_splits == 1:
        return out.reshape(b, t, h, v_dim)
    return combine_splits(out.reshape(b, t, num_splits, h, v_dim), lse.reshape(b, t, num_splits, h), q.dtype)
