"""Sparse MLA attention forward and backward as Pallas kernels with the Mosaic lowering (TPU).

Same function as `pallas_kernels/sparse_mla/reference.py` (spec §2-§3, absorbed MQA mode): one
program per (batch, query) handles all H heads, because the H heads share every gathered KV
row (one gathered block feeds an [H, Dqk] x [Dqk, block_k] matmul on the MXU).

Forward. The query's selected-row indices arrive in SMEM (a per-query [1, K] block, see below);
KV stays in HBM (`memory_space=pl.ANY`) and the kernel DMA-gathers the selected rows, one row
per DMA, into a double-buffered VMEM block of `block_k` rows: block j+1 is in flight while
block j is scored. Online softmax in float32 over the blocks; the output and the log-sum-exp
are written at the end. Unused slots (-1) issue no DMA and are masked to -inf; the gather
buffers are zeroed first, so a skipped row holds zeros or a stale real row, never NaN. The walk
ends at the query's last used index block (`blocks.py`, counted from the VMEM copy of the
indices), in the backward and the decode kernel too: trailing blocks of -1 cost neither row
DMAs nor matmuls.

Backward. Same grid and walk, recomputing P from the saved log-sum-exp. dq is accumulated per
query in VMEM. dkv is a float32 [B, S, Dqk] array in HBM, aliased from a zeros input, updated
by read-modify-write: each block's rows of dkv are DMA-gathered (triple-buffered), the block's
row gradients (scale·dSᵀq + Pᵀ dO on the latent part) added, and the rows DMA-scattered back.
The query axis is "arbitrary" (sequential on a core) and every write-back completes before the
next query reads, so rows shared by several queries accumulate exactly; batch rows touch
disjoint rows of dkv and run "parallel". Within a query, the blocks' read-modify-writes overlap
(block j + 1's rows are read before block j's are written back), so a row must appear once per
query: the wrapper gives the kernel each query's distinct rows (a sort of its indices, ~K log K
compares against the kernel's K row DMAs), each weighted by how many slots selected it, and the
kernel scales the row's probability by that count. That is the exact gradient of attention over
the repeated rows (a row selected m times carries m·p of the softmax mass; its dS and dV terms
scale with it), and for distinct indices the weights are 1. The sort costs compile time and code
(compiled for v6e at T = 4096, K = 2048: 11.7 s and 6.8 MB against 0.9 s and 0.7 MB without it;
XLA's cost model prices it at ~0.7 ms there, 10.8 ms at T = 64K), so `unique_indices=True`, the
model's DSA path (the indexer's top-k never repeats a key), passes the indices as they are.
Indices must lie in [-1, S): a row DMA has no bounds clamp (`ops.sparse_mla` makes any other
index -1).

TPU-specific layout choices (why):
- Indices are a per-query SMEM block (pipelined HBM->SMEM by Pallas) rather than one
  scalar-prefetched [B, T, K] array: SMEM is 1 MiB per core (v4 and later), and [B, T, K]
  int32 is 8 KiB per query at K = 2048, so a whole-array scalar prefetch stops fitting at
  T = 128. A second copy of the same block in VMEM gives the [1, block_k] vector mask.
- bf16 KV rows are gathered as 32-bit words: one row DMA into a bf16 VMEM buffer would write
  half of each packed sublane (bf16 packs two rows per 32-bit sublane word). The wrapper packs
  each row into int32 words [latent[:V/2] ++ rope | latent[V/2:] ++ zeros] (low | high 16 bits),
  so a row is one sublane of an (8, 128)-tiled int32 buffer, and unpacking is a shift or a mask
  plus a same-width bitcast (the trick Pallas's ragged paged attention uses). Both value halves
  (V/2 = 256 at V3.2 shapes) start on 128-lane boundaries; the rope part (64) starts at lane
  256 of the low half. Cost: 1280 instead of 1152 bytes per row. float32 KV is gathered as is.
- Every matmul has one side with the 128-lane-aligned pieces q[:, :256], q[:, 256:512],
  q[:, 512:] and accumulates in float32 (`preferred_element_type`); m, l are [H, 1] columns.
- Block shapes: q/out/dq blocks are whole [H, Dqk] / [H, V] slabs of one query (the last two
  dims equal the array's), the log-sum-exp is stored as [B, T, H, 1] for the same reason, and
  the index block is [1, K_padded] of a [B, T, 1, K_padded] array. block_k (default 128) is a
  multiple of 128 so the [1, block_k] mask slices start on lane-tile boundaries; K <= block_k
  makes one block of K rows rounded up to 8 (no padded rows to loop over).

Compiled for TPU v4, v5e, v5p and v6e by `experiments/tpu_aot.py` (libtpu's compiler on a CPU
machine). Expected TPU bottleneck (not measured: no TPU here): the scalar core issues one DMA per selected
row (three in the backward: KV, dkv in, dkv out), while the MXU work per row is only
2·H·(Dqk+V) FLOP (~0.3 ns at H=128 on a v6e); per-row descriptor issue, not the MXU or HBM, is
likely to set the speed. Queries do not prefetch the next query's first block.

Shapes: B batch, T queries, S keys, H heads, D = Dqk, V = v_dim (values = kv[..., :V]),
R = D - V (RoPE dims), K selected rows per query.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_mla.blocks import walked_blocks

_HIGH_HALF = -65536  # int32 0xFFFF0000: keeps a word's high bf16 as the top bits of a float32


def _check_shapes(kv, v_dim, block_k):
    if v_dim % 2:
        raise ValueError(f"sparse_mla (Mosaic): v_dim must be even (it is split in two lane halves), got {v_dim}")
    if kv.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"sparse_mla (Mosaic): kv dtype must be float32 or bfloat16, got {kv.dtype}")
    if block_k <= 0:
        raise ValueError(f"sparse_mla (Mosaic): block_k must be positive, got {block_k}")


def _pack_rows(kv, v_dim):
    """bf16 kv [B, S, D] -> int32 [B, S, V/2 + R]: low 16 bits latent[:V/2] ++ rope, high latent[V/2:] ++ 0."""
    half = v_dim // 2
    lo = jnp.concatenate([kv[..., :half], kv[..., v_dim:]], axis=-1)
    hi = jnp.pad(kv[..., half:v_dim], [(0, 0), (0, 0), (0, lo.shape[-1] - (v_dim - half))])
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(bits(lo) | (bits(hi) << 16), jnp.int32)


def low_bf16(words):
    """int32 words -> the bf16 values in their low 16 bits (a bf16 is the top 16 bits of the same float32)."""
    return jax.lax.bitcast_convert_type(words << 16, jnp.float32).astype(jnp.bfloat16)


def high_bf16(words):
    """int32 words -> the bf16 values in their high 16 bits."""
    return jax.lax.bitcast_convert_type(words & _HIGH_HALF, jnp.float32).astype(jnp.bfloat16)


def _split_rows(rows, v_dim):
    """Gathered rows -> (latent[:V/2], latent[V/2:], rope), each [block_k, ·], in the KV dtype."""
    half = v_dim // 2
    if rows.dtype == jnp.int32:  # packed bf16 pairs
        lo, hi = low_bf16(rows), high_bf16(rows)
        return lo[:, :half], hi[:, :half], lo[:, half:]
    return rows[:, :half], rows[:, half:v_dim], rows[:, v_dim:]


def _dot_nt(a, b):
    """a [M, C] · b [N, C]ᵀ -> [M, N] float32 (the MXU's native transposed-rhs form)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [C, M]ᵀ · b [C, N] -> [M, N] float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _row_copies(idx_smem, block, block_k, copy, method):
    """Calls copy(row index, slot row).<method>() for each used slot of index block `block`."""
    def row(r, carry):
        i = idx_smem[0, block * block_k + r]

        @pl.when(i >= 0)  # unused slots move nothing
        def _():
            getattr(copy(i, r), method)()

        return carry

    jax.lax.fori_loop(0, block_k, row, 0)


def _gather(src, buf, sem, slot):
    """Descriptor factory: HBM row i of src -> row r of buf[slot]."""
    return lambda i, r: pltpu.make_async_copy(src.at[pl.ds(i, 1)], buf.at[slot, pl.ds(r, 1)], sem.at[slot])


def _scatter(buf, dst, sem, slot):
    """Descriptor factory: row r of buf[slot] -> HBM row i of dst."""
    return lambda i, r: pltpu.make_async_copy(buf.at[slot, pl.ds(r, 1)], dst.at[pl.ds(i, 1)], sem.at[slot])


def _slot_block(vmem, j, block_k):
    """[1, block_k]: index block j's slots of a per-query [1, K_padded] VMEM block (indices or row weights)."""
    return vmem[:, pl.ds(pl.multiple_of(j * block_k, block_k), block_k)]


def _walk(used, block_k, total):
    """Index blocks a program walks: up to the last True of used [1, N] (`blocks.py`), or its only block (total 1) as
    a static trip count, whose mask slice then starts at the static lane 0 (K <= block_k slots need not be a multiple
    of 128; at a traced block index Mosaic cannot prove the start aligned and refuses it)."""
    return total if total == 1 else walked_blocks(used, block_k)


def _pipelined(copies, num_blocks, step, init):
    """carry = step(j, slot, carry) for the gathered blocks j = 0 .. num_blocks - 1, double-buffered:
    copies(j, slot, "start" | "wait") moves block j into buffer slot; block j + 1 is in flight while j is used."""
    copies(0, 0, "start")

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _():
            copies(j + 1, 1 - slot, "start")

        copies(j, slot, "wait")
        return step(j, slot, carry)

    return jax.lax.fori_loop(0, num_blocks, body, init)


def _attend_block(q_parts, k_parts, v_parts, used, carry, acc_ref, scale):
    """One block of the online softmax (float32): scores Σ q_parts[i] · k_parts[i]ᵀ [H, N], -inf where
    used [1, N] is False; acc_ref [H, V] is rescaled and gets p · v_parts (its columns in order).
    carry (m, l) [H, 1] -> the new carry."""
    m, l = carry
    s = functools.reduce(jnp.add, (_dot_nt(a, b) for a, b in zip(q_parts, k_parts))) * scale
    s = jnp.where(used, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - shift)
    alpha = jnp.exp(m - shift)
    pv = p.astype(v_parts[0].dtype)
    first = 0
    for v in v_parts:
        cols = slice(first, first + v.shape[1])
        acc_ref[:, cols] = acc_ref[:, cols] * alpha + jnp.dot(pv, v, preferred_element_type=jnp.float32)
        first += v.shape[1]
    return m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True)


def _finish(acc_ref, m, l):
    """(out [H, V], lse [H, 1]) float32 of the online softmax; a query that selected nothing: zeros, lse -inf."""
    safe_l = jnp.where(l > 0, l, 1.0)
    return acc_ref[...] / safe_l, jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def _softmax_init(heads):
    return jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32)


def _fwd_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, o_ref, lse_ref, kv_buf, kv_sem, acc_ref, *, scale, v_dim,
                block_k):
    half = v_dim // 2
    kv_rows = kv_hbm.at[pl.program_id(0)]
    copies = lambda j, slot, method: _row_copies(idx_smem, j, block_k, _gather(kv_rows, kv_buf, kv_sem, slot), method)
    kv_buf[...] = jnp.zeros(kv_buf.shape, kv_buf.dtype)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    q = q_ref[...]
    q_parts = (q[:, :half], q[:, half:v_dim], q[:, v_dim:])

    def step(j, slot, carry):
        kn1, kn2, kr = _split_rows(kv_buf[slot], v_dim)
        used = _slot_block(idx_vmem, j, block_k) >= 0
        return _attend_block(q_parts, (kn1, kn2, kr), (kn1, kn2), used, carry, acc_ref, scale)

    num_blocks = _walk(idx_vmem[...] >= 0, block_k, idx_vmem.shape[-1] // block_k)
    m, l = _pipelined(copies, num_blocks, step, _softmax_init(q.shape[0]))
    out, lse = _finish(acc_ref, m, l)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _interpret_params(interpret):
    """False (compile for TPU), True (the TPU interpreter's defaults) or a given pltpu.InterpretParams."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _block_k(block_k, k):
    """Rows per gathered block: block_k, or all K (rounded up to 8 rows) when they fit in one block.

    A single block is the whole [1, K_padded] index row, so its mask slice starts at lane 0 and
    K need not be a multiple of 128; with several blocks, block_k should be a multiple of 128.
    """
    return min(block_k, -(-k // 8) * 8)


def _layout(kv, indices, v_dim, block_k):
    """(gathered-row array [B, S, W], indices [B, T, 1, K_padded] with -1 padding)."""
    k = indices.shape[-1]
    kp = -(-k // block_k) * block_k
    idx = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, kp - k)), constant_values=-1)[:, :, None, :]
    rows = _pack_rows(kv, v_dim) if kv.dtype == jnp.bfloat16 else kv
    return rows, idx


def _distinct_rows(indices):
    """(rows int32, weights float32) [B, T, K]: each query's selected rows once (ascending, -1 in the other
    slots), weighted by how many of its slots select the row (0 in the other slots). Sorted as unsigned, so
    the unused slots (-1) come last and the kernel's walk ends at the last row (`blocks.py`)."""
    k = indices.shape[-1]
    bits = jax.lax.bitcast_convert_type
    rows = bits(jnp.sort(bits(indices.astype(jnp.int32), jnp.uint32), axis=-1), jnp.int32)
    pos = jnp.arange(k, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(rows[..., :1], bool), rows[..., 1:] != rows[..., :-1]], axis=-1)
    # A run of equal indices ends where the next begins: the least run start after each slot.
    later_starts = jnp.concatenate([jnp.where(first, pos, k)[..., 1:], jnp.full_like(rows[..., :1], k)], axis=-1)
    count = jax.lax.cummin(later_starts, axis=rows.ndim - 1, reverse=True) - pos
    keep = first & (rows >= 0)
    return jnp.where(keep, rows, -1), jnp.where(keep, count, 0).astype(jnp.float32)


def _per_query(shape):
    """BlockSpec of one (batch, query) slab of a [B, T, ...] array."""
    return pl.BlockSpec((None, None) + tuple(shape), lambda b, t: (b, t) + (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_k", "interpret"))
def sparse_mla_fwd(q, kv, indices, *, scale, v_dim, block_k=128, interpret=False):
    """q [B,T,H,D], kv [B,S,D], indices [B,T,K] -> (out [B,T,H,v_dim] in q's dtype, lse [B,T,H] f32)."""
    _check_shapes(kv, v_dim, block_k)
    b, t, h, d = q.shape
    block_k = _block_k(block_k, indices.shape[-1])
    rows, idx = _layout(kv, indices, v_dim, block_k)
    kernel = functools.partial(_fwd_kernel, scale=scale, v_dim=v_dim, block_k=block_k)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, t),
        in_specs=[
            pl.BlockSpec((None, None, 1, idx.shape[-1]), lambda b_, t_: (b_, t_, 0, 0), memory_space=pltpu.SMEM),
            _per_query(idx.shape[2:]),
            _per_query((h, d)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[_per_query((h, v_dim)), _per_query((h, 1))],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, v_dim), q.dtype), jax.ShapeDtypeStruct((b, t, h, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, block_k, rows.shape[-1]), rows.dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((h, v_dim), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_params(interpret),
        name="sparse_mla_fwd",
    )(idx, idx, q, rows)
    return out, lse[..., 0]


def _bwd_kernel(idx_smem, weight_vmem, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, _dkv_in, dq_ref, dkv_hbm,
                kv_buf, g_buf, kv_sem, g_in_sem, g_out_sem, dq_acc, *, scale, v_dim, block_k):
    half = v_dim // 2
    num_blocks = _walk(weight_vmem[...] > 0, block_k, weight_vmem.shape[-1] // block_k)
    kv_rows, dkv_rows = kv_hbm.at[pl.program_id(0)], dkv_hbm.at[pl.program_id(0)]

    def kv_copies(j, slot, method):
        _row_copies(idx_smem, j, block_k, _gather(kv_rows, kv_buf, kv_sem, slot), method)

    def g_in(j, method):  # dkv rows of block j -> g_buf[j % 3]
        _row_copies(idx_smem, j, block_k, _gather(dkv_rows, g_buf, g_in_sem, j % 3), method)

    def g_out(j, method):  # g_buf[j % 3] -> dkv rows of block j
        _row_copies(idx_smem, j, block_k, _scatter(g_buf, dkv_rows, g_out_sem, j % 3), method)

    kv_buf[...] = jnp.zeros(kv_buf.shape, kv_buf.dtype)
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    q, do = q_ref[...], do_ref[...]
    q1, q2, qr = q[:, :half], q[:, half:v_dim], q[:, v_dim:]
    do1, do2 = do[:, :half], do[:, half:]
    lse, delta = lse_ref[...], delta_ref[...]
    finite = lse > -jnp.inf
    lse = jnp.where(finite, lse, 0.0)
    kv_copies(0, 0, "start")
    g_in(0, "start")

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _():
            kv_copies(j + 1, 1 - slot, "start")

        # g_buf[(j + 1) % 3] last held block j - 2: its write-back must land before the refill.
        @pl.when(j >= 2)
        def _():
            g_out(j - 2, "wait")

        @pl.when(j + 1 < num_blocks)
        def _():
            g_in(j + 1, "start")

        kv_copies(j, slot, "wait")
        g_in(j, "wait")
        kn1, kn2, kr = _split_rows(kv_buf[slot], v_dim)
        s = (_dot_nt(q1, kn1) + _dot_nt(q2, kn2) + _dot_nt(qr, kr)) * scale
        weight = _slot_block(weight_vmem, j, block_k)  # [1, block_k]: how many slots selected the row (0: unused)
        p = jnp.where((weight > 0) & finite, jnp.exp(s - lse) * weight, 0.0)  # [H, block_k]
        dp = _dot_nt(do1, kn1) + _dot_nt(do2, kn2)
        ds = (p * (dp - delta) * scale).astype(kn1.dtype)
        dq_acc[:, :half] += jnp.dot(ds, kn1, preferred_element_type=jnp.float32)
        dq_acc[:, half:v_dim] += jnp.dot(ds, kn2, preferred_element_type=jnp.float32)
        dq_acc[:, v_dim:] += jnp.dot(ds, kr, preferred_element_type=jnp.float32)
        pt = p.astype(do.dtype)
        g = j % 3
        g_buf[g, :, :half] += _dot_tn(ds, q1) + _dot_tn(pt, do1)
        g_buf[g, :, half:v_dim] += _dot_tn(ds, q2) + _dot_tn(pt, do2)
        g_buf[g, :, v_dim:] += _dot_tn(ds, qr)
        g_out(j, "start")
        return carry

    jax.lax.fori_loop(0, num_blocks, body, 0)
    # The write-backs not yet waited for: blocks num_blocks - 2 and num_blocks - 1 (pl.when: a plain `if` when the
    # walk is static, a cond when it is counted).
    for back in (2, 1):
        pl.when(num_blocks >= back)(functools.partial(g_out, num_blocks - back, "wait"))

    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_k", "unique_indices", "interpret"))
def sparse_mla_bwd(q, kv, indices, out, lse, d_out, *, scale, v_dim, block_k=128, unique_indices=False,
                   interpret=False):
    """Gradients (dq [B,T,H,D] in q's dtype, dkv [B,S,D] in kv's dtype) of `sparse_mla_fwd`'s output.

    unique_indices: no query repeats a row, so its indices go to the kernel as they are (weight 1 per used slot),
    not sorted and merged first (module docstring); a repeated row's dkv is then undefined.
    """
    _check_shapes(kv, v_dim, block_k)
    b, t, h, d = q.shape
    s = kv.shape[1]
    block_k = _block_k(block_k, indices.shape[-1])
    # A row must appear once per query (module docstring).
    distinct, weights = ((indices, (indices >= 0).astype(jnp.float32)) if unique_indices
                         else _distinct_rows(indices))
    rows, idx = _layout(kv, distinct, v_dim, block_k)
    weights = jnp.pad(weights, ((0, 0), (0, 0), (0, idx.shape[-1] - weights.shape[-1])))[:, :, None, :]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[..., None]  # Δ = rowsum(dO ⊙ O)
    kernel = functools.partial(_bwd_kernel, scale=scale, v_dim=v_dim, block_k=block_k)
    dq, dkv = pl.pallas_call(
        kernel,
        grid=(b, t),
        in_specs=[
            pl.BlockSpec((None, None, 1, idx.shape[-1]), lambda b_, t_: (b_, t_, 0, 0), memory_space=pltpu.SMEM),
            _per_query(idx.shape[2:]),
            _per_query((h, d)),
            _per_query((h, v_dim)),
            _per_query((h, 1)),
            _per_query((h, 1)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[_per_query((h, d)), pl.BlockSpec(memory_space=pl.ANY)],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, d), q.dtype), jax.ShapeDtypeStruct((b, s, d), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, block_k, rows.shape[-1]), rows.dtype), pltpu.VMEM((3, block_k, d), jnp.float32),
                        pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((3,)), pltpu.SemaphoreType.DMA((3,)),
                        pltpu.VMEM((h, d), jnp.float32)],
        input_output_aliases={7: 1},
        # Queries of one batch row update shared dkv rows: sequential on a core ("arbitrary").
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_params(interpret),
        name="sparse_mla_bwd",
    )(idx, weights, q, d_out.astype(q.dtype), lse[..., None], delta, rows, jnp.zeros((b, s, d), jnp.float32))
    return dq, dkv.astype(kv.dtype)
