"""Decode sparse MLA attention as a Pallas kernel with the Mosaic lowering (TPU), DMA-gathering the selected
rows straight from the stacked cache.

Same function as `pallas_kernels/sparse_mla/reference.py::sparse_mla_decode_reference` (spec §2-§3,
absorbed MQA mode) for the decode shape: T queries per sequence (1, or 1 + drafts), each over its
own K selected rows of one layer of the cache [L, B, S, Dqk]. One program per (sequence, query)
takes all H heads (they share every row), as the prefill kernel `mosaic.py` does, and reuses its
machinery: per-row DMAs (`_row_copies`, `_gather`) into a double-buffered VMEM block of block_k
selected rows (`_pipelined`), the online softmax step (`_attend_block`), the final normalisation.

TPU-specific choices (why):
- `layer` is scalar-prefetched (SMEM) and the cache stays in HBM (`memory_space=pl.ANY`): the DMAs
  read rows of kv_cache[layer, b] in place, so XLA neither gathers the rows into a [B, T·K, D]
  array nor slices the layer out. `layer` may be traced (the model scans over layers).
- The indices are not scalar-prefetched whole: [B, T, K] int32 is 512 KiB at B = 64, T = 1,
  K = 2048 and 1 MiB at T = 2, the size of SMEM. Each query's index row arrives as an SMEM block
  (pipelined by Pallas), as in the prefill kernel.
- bf16 rows are DMA'd as 32-bit words. A TPU bf16 tile packs rows 2j and 2j + 1 into one 32-bit
  sublane word, and Mosaic accepts a row DMA at any offset only for 32-bit rows (a 2-row bf16 slice
  at an even offset fails to compile: "offsets along tiled dimensions must be aligned to tiles",
  found by compiling for TPU with `experiments/tpu_aot.py`). So the kernel views the cache ref in
  place as int32 [L, B, S/2, D] (`ref.bitcast`, no copy) and DMAs word row i // 2, which holds row
  i and its partner: unpacked in VMEM into the even rows (low halves) and the odd rows (high
  halves), each scored as a block of the online softmax under its own slot mask (built in XLA from
  the indices), so the partner counts for nothing. The matmuls run over both halves (2x the MXU
  work; per-row DMA issue, not the MXU, is the expected bottleneck, see mosaic.py); the partner is
  a real cache row (finite), so p = 0 times it adds nothing. The prefill kernel instead packs its
  kv into int32 first, a copy of the whole cache here. float32 rows are DMA'd as they are. A bf16
  cache needs an even S (generate.py sizes caches in multiples of 64). Interpret mode (jax 0.10.2)
  cannot DMA from a bitcast ref, so there XLA bitcasts the cache first (a copy; the same words,
  by Pallas' definition of the TPU bitcast: row 2j in the low half). Which half holds the even
  row on a real TPU is that definition too; not checked on one.
- q [H, D] and the output [H, V] are whole blocks per query; q is split at V (lane-aligned at 512)
  into the latent and RoPE parts of the score matmuls.

Not measured on a TPU (none here); run under `pltpu.InterpretParams` in the tests (DMAs and
semaphores simulated), lowered for TPU by `jax.export` (Pallas's checks) and compiled for TPU v4,
v5e, v5p and v6e by `experiments/tpu_aot.py` (libtpu's compiler, Mosaic's checks, no TPU needed).

Shapes: L layers, B batch, T queries, S cache rows, H heads, D = Dqk, V = v_dim, K selected rows, G rows
per 32-bit word (2 for bf16, 1 for float32).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_mla.mosaic import (
    _attend_block,
    _block_k,
    _finish,
    _gather,
    _interpret_params,
    _pipelined,
    _row_copies,
    _slot_block,
    _softmax_init,
    _walk,
    high_bf16,
    low_bf16,
)


def _decode_kernel(layer_ref, starts_smem, slots_vmem, q_ref, kv_hbm, o_ref, kv_buf, kv_sem, acc_ref, *, scale,
                   v_dim, block_k, group, bitcast):
    cache = kv_hbm.bitcast(jnp.int32) if bitcast else kv_hbm  # bf16 [L, B, S, D] in place as int32 [L, B, S / 2, D]
    kv_rows = cache.at[layer_ref[0], pl.program_id(0)]
    copies = lambda j, slot, method: _row_copies(starts_smem, j, block_k, _gather(kv_rows, kv_buf, kv_sem, slot),
                                                 method)
    kv_buf[...] = jnp.zeros(kv_buf.shape, kv_buf.dtype)  # slots no DMA fills hold zeros, never NaN
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    q = q_ref[...]
    q_parts = (q[:, :v_dim], q[:, v_dim:])

    def step(j, slot, carry):
        words = kv_buf[slot]  # [block_k, D]: the selected rows' words
        # bf16: each word holds rows 2i (low half) and 2i + 1 (high half); the slot mask keeps the selected one.
        halves = (low_bf16(words), high_bf16(words)) if group > 1 else (words,)
        for p, rows in enumerate(halves):
            used = _slot_block(slots_vmem, group * j + p, block_k) >= 0
            carry = _attend_block(q_parts, (rows[:, :v_dim], rows[:, v_dim:]), (rows[:, :v_dim],), used, carry,
                                  acc_ref, scale)
        return carry

    # Up to the block of the last used slot (`blocks.py`): mask blocks G·j .. G·j + G - 1 are block j's.
    num_blocks = _walk(slots_vmem[...] >= 0, group * block_k, starts_smem.shape[-1] // block_k)
    m, l = _pipelined(copies, num_blocks, step, _softmax_init(q.shape[0]))
    o_ref[...] = _finish(acc_ref, m, l)[0].astype(o_ref.dtype)


def _slots(indices, kp, block_k, group):
    """(DMA word rows [B, T, 1, Kp], slot masks [B, T, 1, G·Kp]): index i is DMA'd as word row i // G; mask block
    G·j + p (block_k slots) holds block j's indices i with i % G == p, -1 elsewhere. -1 = unused."""
    idx = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, kp - indices.shape[-1])), constant_values=-1)
    starts = jnp.where(idx >= 0, idx // group, -1)
    blocks = idx.reshape(idx.shape[:2] + (kp // block_k, 1, block_k))
    which = jnp.arange(group, dtype=jnp.int32)[:, None]
    slots = jnp.where((blocks >= 0) & (blocks % group == which), blocks, -1)
    return starts[:, :, None, :], slots.reshape(idx.shape[:2] + (1, group * kp))


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_k", "interpret"))
def sparse_mla_decode_mosaic(q, kv_cache, layer, indices, *, scale, v_dim=512, block_k=128, interpret=False):
    """Same contract as `sparse_mla_decode_reference`: q [B, T, H, D], kv_cache [L, B, S, D] (bf16 or float32,
    read in place; S even for bf16), layer int32 scalar (may be traced), indices [B, T, K] -> [B, T, H, v_dim]
    in q's dtype. block_k: selected rows per gathered block (a multiple of 128 when K spans several)."""
    b, t, h, d = q.shape
    s = kv_cache.shape[2]
    if kv_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"sparse_mla_decode_mosaic: kv_cache dtype must be bfloat16 or float32, got {kv_cache.dtype}")
    group = 4 // kv_cache.dtype.itemsize
    if s % group:
        raise ValueError(f"sparse_mla_decode_mosaic: a bf16 cache is read in row pairs: S must be even, got {s}")
    if block_k <= 0:
        raise ValueError(f"sparse_mla_decode_mosaic: block_k must be positive, got {block_k}")
    block_k = _block_k(block_k, indices.shape[-1])
    kp = -(-indices.shape[-1] // block_k) * block_k
    starts, slots = _slots(indices, kp, block_k, group)
    # bf16: the kernel reads the cache in place as int32 words. Interpret mode (jax 0.10.2) cannot DMA from a
    # bitcast ref: there XLA bitcasts the cache first (a copy of it, the same words).
    in_xla = group > 1 and interpret
    cache = pltpu.bitcast(kv_cache, jnp.int32) if in_xla else kv_cache
    kernel = functools.partial(_decode_kernel, scale=scale, v_dim=v_dim, block_k=block_k, group=group,
                               bitcast=group > 1 and not in_xla)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, t),
        in_specs=[
            pl.BlockSpec((None, None, 1, kp), lambda b_, t_, _: (b_, t_, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, 1, group * kp), lambda b_, t_, _: (b_, t_, 0, 0)),
            pl.BlockSpec((None, None, h, d), lambda b_, t_, _: (b_, t_, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),  # the whole stacked cache: the kernel DMAs rows of (layer, b)
        ],
        out_specs=pl.BlockSpec((None, None, h, v_dim), lambda b_, t_, _: (b_, t_, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, block_k, d), jnp.int32 if group > 1 else kv_cache.dtype),
                        pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((h, v_dim), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, t, h, v_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_params(interpret),
        name="sparse_mla_decode",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), starts, slots, q, cache)
