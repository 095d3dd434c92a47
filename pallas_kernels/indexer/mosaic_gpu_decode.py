"""Decode lightning-indexer scores as a Mosaic GPU Pallas kernel (Hopper), read by TMA from the stacked cache.

Same function and output as `indexer_scores_decode_triton` (`pallas_kernels/indexer/triton_decode.py`):
query t of sequence b scores the keys s < k_len[b, t] of one layer of k_cache [L, B, S, D],
I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[layer, b, s]) in float32, -inf elsewhere.
Why a second kernel: decode is a stream of keys (64 B·S·D bytes, ~128 FLOP per byte at H = 64), and
the Triton kernel reached 30 % of the H200's HBM bandwidth; its scores kernel took nearly all of
the step. Here each CTA streams a span of `blocks` key blocks of one sequence through a ring of
`num_stages` shared-memory slots by TMA (a producer warpgroup: the loads of the next blocks are in
flight while a block is scored; 4 slots of 32 KiB bf16 keys are 128 KiB in flight per SM), and one
consumer warpgroup scores each block with one wgmma for the T queries (keys x (query, head): A =
the key tile, B = qᵀ; accumulator [block_s, T·H] float32, as `pallas_kernels/indexer/mosaic_gpu.py`) and
writes it by TMA. At V3.2's shapes a block's matmul and epilogue take far less time than its
bytes at an SM's share of the bandwidth, so one consumer keeps up.
- The layer is an operand (traced in the model's layer scan) and the TMA reads at (layer, b, block)
  of the cache seen as [L·B, S, D] (a free reshape): it is never sliced, padded or copied. The
  last block's rows past S are out of bounds, which TMA fills with zeros; their scores are -inf
  (k_len <= S).
- A block past every query's k_len is neither loaded nor scored: -inf is written.
- Grid (splits, B): splits = ceil(S / (blocks · block_s)) CTAs per sequence.

bf16/f16 or fp8 e4m3 q and cache (both operands K-major, as Hopper's fp8 wgmma wants), D a whole
128-byte swizzle row (64 bf16 or 128 fp8 elements; V3.2's 128 is both), S a multiple of 8 (the TMA
reads the cache in tiles of 8 keys; the cache is not padded). Heads are padded to a multiple of 16.
Untimed: written without a GPU (2026-11-30); checked under Mosaic GPU's interpreter against the
Triton kernel and lowered for CUDA (tests/pallas_kernels/test_indexer_mosaic_gpu.py).
experiments/bench_kernels.py --parts=decode times it (configs ending in ":mgpu").

Shapes: L layers, B batch, T queries, S cache length, H heads, D head dim.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.indexer.mosaic_gpu import (
    ROW,
    block_logits,
    check_operands,
    fill_masked,
    in_layout,
    interpret_params,
    load_in_layout,
    padded_heads,
    produce_keys,
    query_weights,
    smem_transforms,
    store_masked,
    store_scores,
)

BLOCK_S, BLOCKS, NUM_STAGES = 128, 64, 4  # keys per block, blocks per CTA, ring slots


def _decode_kernel(layer_ref, klen_ref, steps_ref, q_ref, w_ref, k_ref, *rest, block_s, blocks, num_stages,
                   interpreted):
    """Grid (splits, B), 2 warpgroups: the consumer 0, the producer 1 (module docstring)."""
    ks_ref, out_ref = rest if len(rest) == 2 else (None, rest[0])
    split, b = jax.lax.axis_index("split"), jax.lax.axis_index("batch")
    _, t, hp = w_ref.shape
    d = q_ref.shape[2]
    first = split * blocks  # the CTA's first key block
    steps = steps_ref[b, split]  # blocks some query sees, loaded and scored; the rest of the span is -inf
    span = jnp.minimum(blocks, out_ref.shape[2] // block_s - first)
    row = layer_ref[0] * out_ref.shape[0] + b  # the cache's row (layer, b) of [L·B, S, D]

    def body(q_smem, w_smem, k_smem, ks_smem, o_smem, ninf_smem, q_barrier, k_barriers, consumed):
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == 0)
        def _consumer():
            plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem, q_barrier)
            plgpu.copy_gmem_to_smem(w_ref.at[b], w_smem, q_barrier)
            limits = [klen_ref[b, i] for i in range(t)]
            fill_masked(ninf_smem, interpreted)
            plgpu.barrier_wait(q_barrier)
            weights = query_weights(w_smem, block_s, interpreted)
            keys = in_layout(jax.lax.iota(jnp.int32, block_s), ROW, interpreted)

            dst = lambda step: out_ref.at[b, :, pl.ds((first + step) * block_s, block_s)]

            @pl.loop(0, steps)
            def _step(step):
                slot = jax.lax.rem(step, num_stages)
                plgpu.barrier_wait(k_barriers.at[slot])
                accs = block_logits(k_smem.at[slot], q_smem, hp)
                k_scale = None if ks_ref is None else load_in_layout(ks_smem.at[slot], ROW, interpreted)
                plgpu.barrier_arrive(consumed.at[slot])  # the slot's keys and scales are in registers now
                store_scores(o_smem, step, accs, weights, k_scale, keys + (first + step) * block_s, limits, dst(step))

            store_masked(ninf_smem, steps, span, dst)

        @pl.when(wg == 1)
        def _producer():
            produce_keys(steps, num_stages, lambda step: (row, pl.ds((first + step) * block_s, block_s)), k_ref,
                         ks_ref, k_smem, ks_smem, k_barriers, consumed)

    pl.run_scoped(
        body,
        plgpu.SMEM((t * hp, d), q_ref.dtype, transforms=smem_transforms(q_ref.dtype)),
        plgpu.SMEM((t, hp), jnp.float32),
        plgpu.SMEM((num_stages, block_s, d), k_ref.dtype, transforms=smem_transforms(k_ref.dtype)),
        None if ks_ref is None else plgpu.SMEM((num_stages, block_s), jnp.float32),
        plgpu.SMEM((2, t, block_s), jnp.float32),
        plgpu.SMEM((t, block_s), jnp.float32),
        plgpu.Barrier(num_arrivals=2),  # q and w
        plgpu.Barrier(num_arrivals=1 if ks_ref is None else 2, num_barriers=num_stages),  # a slot's keys (+ scales)
        plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),  # a slot consumed
        collective_axes="wg",
    )


def indexer_scores_decode_mosaic_gpu(q, k_cache, w, layer, k_len, k_scale=None, *, block_s=BLOCK_S, blocks=BLOCKS,
                                     num_stages=NUM_STAGES, interpret=False):
    """Scores [B, T, Sp] float32 (-inf where s >= k_len[b, t] or s >= S; Sp: S rounded up to block_s) of q
    [B, T, H, D] against k_cache[layer] ([L, B, S, D], read in place), k_scale [L, B, S] or None.
    interpret: run under Mosaic GPU's interpreter (CPU)."""
    b, t, h, d = q.shape
    n_layers, _, s, _ = k_cache.shape
    check_operands("indexer_scores_decode_mosaic_gpu", q, k_cache, block_s, blocks=blocks, num_stages=num_stages)
    if d * jnp.dtype(q.dtype).itemsize % 128:
        raise ValueError(f"indexer_scores_decode_mosaic_gpu: the head dim D must fill whole 128-byte rows (the cache "
                         f"is read in place, unpadded): {d} x {jnp.dtype(q.dtype).itemsize} bytes")
    if s % 8:
        raise ValueError(f"indexer_scores_decode_mosaic_gpu: the cache length S must be a multiple of 8 (TMA reads the "
                         f"unpadded cache in tiles of 8 keys), got S = {s}")
    num_blocks = -(-s // block_s)
    splits, hp = -(-num_blocks // blocks), padded_heads(h)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, 0), (0, hp - h)))
    k_len = jnp.clip(jnp.asarray(k_len, jnp.int32), 0, s)
    # Per CTA: the blocks up to the last key any of the sequence's queries sees.
    visible = -(-jnp.max(k_len, axis=1) // block_s)  # [B]
    steps = jnp.clip(visible[:, None] - blocks * jnp.arange(splits, dtype=jnp.int32)[None, :], 0, blocks)
    layer = jnp.reshape(jnp.clip(jnp.asarray(layer, jnp.int32), 0, n_layers - 1), (1,))
    # [L·B, S, D]: a free reshape, and a TMA of 3 dims (with the tiled D, [L, B, S, D] would need 6; TMA takes 5).
    # q as [B, T·H, D] for the same reason.
    args = [layer, k_len, steps, q.reshape(b, t * hp, d), w, k_cache.reshape(-1, s, d)]
    args += [] if k_scale is None else [k_scale.astype(jnp.float32).reshape(-1, s)]
    kernel = plgpu.kernel(
        functools.partial(_decode_kernel, block_s=block_s, blocks=blocks, num_stages=num_stages,
                          interpreted=bool(interpret)),
        out_type=jax.ShapeDtypeStruct((b, t, num_blocks * block_s), jnp.float32),
        grid=(splits, b),
        grid_names=("split", "batch"),
        num_threads=2,
        thread_name="wg",
        interpret=interpret_params() if interpret else False,
    )
    return kernel(*args)
