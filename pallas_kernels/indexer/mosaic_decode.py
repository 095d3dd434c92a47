"""Decode lightning-indexer scores as a Pallas kernel with the Mosaic lowering (TPU), read from the stacked cache.

Same function as `pallas_kernels/indexer/reference.py` (spec §3, steps 6-9) for the decode shape
(`ops.indexer_topk_decode`): T queries per sequence (1, or 1 + drafts), query t of sequence b
scores the keys s < k_len[b, t] of one layer of the cache,
I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[layer, b, s]) in float32, as one
[T·H, D] x [D, block_s] MXU matmul per (sequence, key block), then ReLU, the head weights and
the head sum on the VPU; -inf where s >= k_len[b, t]. `indexer_topk_decode_mosaic` selects each
row's top-k with `lax.top_k` (an XLA sort; `selection="sort"`) or `pallas_kernels.topk.select_topk`
(`selection="radix"`), then lists the indices ascending, -1 past the valid keys.

TPU-specific choices (why):
- `layer` and each sequence's largest k_len are scalar-prefetched (SMEM), so the key block's
  index_map picks (layer, b, block, 0) of the stacked cache [L, B, S, D] and the DMA reads
  that layer in place: XLA never slices a [B, S, D] copy of the layer out before the kernel.
  `layer` may be traced (the model scans over layers).
- A block wholly past the sequence's largest k_len is clamped to its last visible block:
  Pallas skips the DMA when the block index does not change, and the kernel skips the matmul.
- FP8 (e4m3) keys are widened to bf16 in VMEM, after the DMA (exact: every e4m3 value is a
  bf16; no fp8 MXU path before TPU v7). Widening outside would copy every layer of the cache.
- The key scales (k_scale [L, B, S], FP8 keys) multiply the scores in XLA after the kernel: a
  (1, block_s) window of one sequence breaks the (8, 128) block rule, and reshaping the stacked
  scales to [L, B, 1, S] would relayout (copy) every layer. The elementwise fusion can read the
  layer's scales in place (4 B per key) and reads and writes the scores once more (8·T B per
  key), next to the keys' 128 B per key (not measured). The scale is one fp32 multiply after
  the head sum, as in the reference, so the scores are the same.
- The selection sorts by default, as the prefill indexer merges (`indexer/mosaic.py`: a TPU gathers
  elements one at a time). Here the case is weaker: at B = 16 and a 128K cache, select_topk
  compiles to 42 gathers of ~2.0M elements in all (both branches of its fallback), ~5.4 ms at
  XLA's v6e cost-model rate, against 0.05 ms for lax.top_k's sort in the same model; the model
  prices that sort by its bytes alone, and even 153 bitonic passes over HBM would be ~1.6 ms.
- q [T, H, D] and w [T, H, 1] are whole blocks per sequence (w's trailing unit dim broadcasts
  the head weights along lanes); keys [block_s, D], scores [T, block_s] (block_s a multiple of
  128).

Not measured on a TPU (none here); run under `pltpu.InterpretParams` in the tests, lowered for
TPU by `jax.export` (Pallas's checks), and compiled, bf16 and fp8 (the in-VMEM e4m3 -> bf16
widening included), for TPU v4, v5e, v5p and v6e by `experiments/tpu_aot.py` (libtpu's compiler).

Shapes: L layers, B batch, T queries, S cache length, H heads, D head dim, K = topk.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.indexer.mosaic import ascending_indices, check_selection
from pallas_kernels.topk import select_topk


def _scores_kernel(layer_ref, kmax_ref, klen_ref, q_ref, w_ref, k_ref, o_ref):
    del layer_ref  # used by the index maps only
    b, first = pl.program_id(0), pl.program_id(1) * k_ref.shape[0]
    t, h, d = q_ref.shape
    block_s = k_ref.shape[0]
    visible = first < kmax_ref[b]

    @pl.when(visible)
    def _():
        k = k_ref[...]
        if k.dtype == jnp.float8_e4m3fn:
            k = k.astype(jnp.bfloat16)
        logits = jax.lax.dot_general(q_ref[...].reshape(t * h, d), k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        scores = jnp.sum(jnp.maximum(logits, 0.0).reshape(t, h, block_s) * w_ref[...], axis=1)  # [T, block_s]
        keys = first + jax.lax.broadcasted_iota(jnp.int32, (t, block_s), 1)
        o_ref[...] = jnp.where(keys < klen_ref[...], scores, -jnp.inf)

    @pl.when(jnp.logical_not(visible))  # a block wholly past every query's k_len: no matmul
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def indexer_scores_decode_mosaic(q, k_cache, w, layer, k_len, k_scale=None, *, block_s=512, interpret=False):
    """Scores [B, T, Sp] float32 (-inf where s >= k_len[b, t] or s >= S) of q [B, T, H, D] against
    k_cache[layer] ([L, B, S, D], read in place), times k_scale[layer] [B, S] if given; Sp = S rounded
    up to block_s (a multiple of 128)."""
    b, t, h, d = q.shape
    s = k_cache.shape[2]
    block_s = min(block_s, -(-s // 128) * 128)
    blocks = -(-s // block_s)
    if q.dtype == jnp.float8_e4m3fn:
        q = q.astype(jnp.bfloat16)  # small; the keys are widened in the kernel
    k_len = jnp.clip(jnp.asarray(k_len, jnp.int32), 0, s)
    kmax = jnp.max(k_len, axis=1)
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))

    def key_block(b_, l, layer_, kmax_):  # clamp blocks past the sequence's keys to its last visible one: no DMA
        last = jax.lax.div(jnp.maximum(kmax_[b_] - 1, 0), block_s)
        return jnp.minimum(l, last)

    in_specs = [
        pl.BlockSpec((None, t, 1), lambda b_, l, *_: (b_, 0, 0)),
        pl.BlockSpec((None, t, h, d), lambda b_, l, *_: (b_, 0, 0, 0)),
        pl.BlockSpec((None, t, h, 1), lambda b_, l, *_: (b_, 0, 0, 0)),
        pl.BlockSpec((None, None, block_s, d), lambda b_, l, *p: (p[0][0], b_, key_block(b_, l, *p), 0)),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, t, block_s), lambda b_, l, *_: (b_, 0, l)),
    )
    scores = pl.pallas_call(
        _scores_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, t, blocks * block_s), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="indexer_scores_decode",
    )(layer, kmax, k_len[..., None], q, w.astype(jnp.float32)[..., None], k_cache)
    if k_scale is None:
        return scores
    scale = jnp.pad(jax.lax.dynamic_index_in_dim(k_scale, layer[0], keepdims=False).astype(jnp.float32),
                    ((0, 0), (0, blocks * block_s - s)))[:, None, :]
    return jnp.where(scores > -jnp.inf, scores * scale, -jnp.inf)  # scale 0 (an all-zero key) must not make NaN


def indexer_topk_decode_mosaic(q, k_cache, w, layer, k_len, *, topk, k_scale=None, selection="sort", interpret=False,
                               **tiles):
    """Same contract as `indexer_topk_decode_reference`: int32 [B, T, topk], -1 for empty slots, indices ascending.

    selection: "sort" (`lax.top_k`) or "radix" (`select_topk`); the same indices either way."""
    check_selection("indexer_topk_decode_mosaic", selection)
    scores = indexer_scores_decode_mosaic(q, k_cache, w, layer, k_len, k_scale, interpret=interpret, **tiles)
    if selection == "radix":
        return select_topk(scores, topk)  # -inf (masked or padded keys) never selected; -1 past the valid keys
    kk = min(topk, scores.shape[-1])
    best, idx = jax.lax.top_k(scores, kk)  # ties: lowest index first; a position is its key's index
    idx = ascending_indices(jnp.where(best > -jnp.inf, idx, -1))
    return jnp.pad(idx, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)
