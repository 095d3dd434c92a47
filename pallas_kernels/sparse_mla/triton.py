"""Sparse MLA attention forward and backward as Pallas kernels with the Triton lowering (GPU).

One program per (query token, block of heads). It walks the query's selected rows in blocks
of `block_k`: gathers their latent [c_kv] and RoPE [k_rope] parts straight from HBM by index
(the rows are shared by every head, so a head block amortises each gather), scores
q_nope·c_kv + q_rope·k_rope, and keeps an online softmax with a float32 accumulator. It writes
the output and the log-sum-exp. Unused slots (-1) are skipped by masking, and the walk ends at
the query's last used index block (`blocks.py`): trailing blocks of -1 cost nothing.

The backward kernel has the same grid and walk: it recomputes p from the saved log-sum-exp,
forms dS = P ⊙ (dO·Vᵀ − Δ) (Δ = rowsum(dO ⊙ O), precomputed), writes dq for its heads, and
adds each gathered row's gradient (scale·dSᵀq + Pᵀ dO on the latent part) into a float32 dkv
with atomic adds: a row is shared by every query that selected it, and by every slot of a query
that repeats it (each lane's add is its own atomic; interpreted, they are a scatter-add:
`triton_lowering.exact_interpreted_atomic_adds`). Those atomics bound it (H200,
T=16K: ~43 TFLOP/s). Two changes since, neither timed on a GPU yet:
- the adds are relaxed (`triton_lowering.relax_atomic_adds`): as Pallas lowers them, acquire-release,
  each compiled to MEMBAR.ALL.GPU + ATOMG + CCTL.IVALL (wait for every outstanding memory
  operation of the thread, then invalidate the SM's L1), 18 of them per row block of the measured
  tile; relaxed, they are fire-and-forget REDs with no barrier;
- `split_dkv=True` moves dkv into a second kernel, one program per query, that sums each row
  block's gradient over all heads before adding it: H/block_h times fewer atomic adds for
  recomputing P and dS once more.

Triton wants power-of-two tiles of at least 16, so the wrapper pads the head, latent and RoPE
dims (zeros change no dot product) and the top-k axis (with -1), and flattens the batch into
the row index. Reference: `pallas_kernels/sparse_mla/reference.py`. Default tiles (32 heads x
64 rows, 4 warps, 2 stages) were the fastest of a sweep on an H200 (experiments/bench_kernels.py):
~226 TFLOP/s at V3.2 shapes (H=128, k=2048), T=16K, launched query-major (and ~217 at T=64K).
The programs now launch head-major (`_grid`): a query's head blocks side by side, so its rows are
gathered from HBM once, not once per head block. That matters only where the KV outgrows L2
(50 MB; 19 MB at 16K, 75 MB at 64K): the equal figures at 16K and 64K say the kernel is not
HBM-bound now, so expect little from it. Measured (H200, jax 0.11.2, 2026-11-29): head-major 1.03x
faster at 16K (40.2 ms, 233 TFLOP/s) and 1.12x at 64K (151.9 ms, 246 TFLOP/s; 171 ms query-major).

Value split (`v_split=N`, forward only, off by default): N programs per (query, head block), each
scoring all of q·k but accumulating only 1/N of the value columns. Why: the default 32-head tile
runs its matmuls on mma.sync, since Hopper's wgmma needs 64 rows per warpgroup, and a 64-head
tile's [64, 512] float32 accumulator is 128 registers per thread at 8 warps before any operand.
Compiled offline for sm_90a through XLA's TTIR passes (`experiments/triton_static.py`), 64-head
tiles do use wgmma: without spills at block_k = 16 (64:16:8:2, 64:16:8:3, 255 registers), with
130-300 B of spills at block_k = 32 and 64. With v_split=2 the accumulator is [64, 256], and
64:32:8:2 and 64:16:8:3 compile to wgmma in 196 / 181 registers without spills (176 / 124 KiB of
shared memory). The price: the QK matmul is done twice, so per (head, row) 2·576 + 512 = 1664
multiply-add dims instead of 1088 (+53 %), and each row is gathered by twice the programs (from
L2 for the second, launched next to the first). Against the unsplit block_k = 16 tile it buys a
quarter of the accumulator rescales per row. Measured at T=16K on the H200 (2026-11-29): 64:16:8:2
107 TFLOP/s, 64:32:8:2:v2 87, 64:16:8:3:v2 54, against the default's 233: wgmma without spills does
not pay here, so the value split stays off.

Shapes: B batch, T queries, S keys, H heads, V latent/value dim (512), R RoPE dim (64),
K selected rows per query.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_mla.blocks import walked_blocks
from pallas_kernels.tiles import next_pow2
from pallas_kernels.triton_lowering import (
    exact_interpreted_atomic_adds,
    relax_atomic_adds,
)


def _index_block(idx_ref, i, block_k):
    """(idx, used, rows) of index block i: the selected row indices, which slots are used (idx >= 0), and the
    rows to read (unused slots read row 0)."""
    idx = idx_ref[pl.ds(i * block_k, block_k)]
    used = idx >= 0
    return idx, used, jnp.where(used, idx, 0)


def attend_blocks(idx_ref, qn, qr, gather, *, scale, block_k, first_block, num_blocks, values=None, value_dim=None):
    """Online softmax of qn [Hb, V], qr [Hb, R] over index blocks first_block .. first_block + num_blocks - 1
    of idx_ref (-1 = unused) -> (m, l, acc [Hb, Vs]) float32 (shared with the decode kernel).

    gather(rows, used) -> (latent [block_k, V], rope [block_k, R]): the rows (unused slots read as row 0).
    values(rows) -> [block_k, value_dim]: the value columns to accumulate (default: the whole latent, Vs = V).
    """
    block_h, v = qn.shape
    v = v if values is None else value_dim

    def body(i, carry):
        m, l, acc = carry
        _, used, rows = _index_block(idx_ref, i, block_k)
        kn, kr = gather(rows, used)
        vals = kn if values is None else values(rows)
        s = (jnp.dot(qn, kn.T, preferred_element_type=jnp.float32)
             + jnp.dot(qr, kr.T, preferred_element_type=jnp.float32))
        s = jnp.where(used[None, :], s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift[:, None])
        alpha = jnp.exp(m - shift)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((block_h, v), jnp.float32))
    return jax.lax.fori_loop(first_block, first_block + num_blocks, body, init)


def normalize(m, l, acc):
    """(out [Hb, V] float32, lse [Hb]) of an online softmax; a query that selected nothing: zeros, lse -inf."""
    safe_l = jnp.where(l > 0, l, 1.0)
    return acc / safe_l[:, None], jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)


def _kernel(idx_ref, qn_ref, qr_ref, kvn_ref, kvr_ref, o_ref, lse_ref, *, scale, block_k, num_k_blocks, v_split,
            head_axis, walk_all):
    gather = lambda rows, used: (kvn_ref[rows, :], kvr_ref[rows, :])
    values, value_dim = None, None
    if v_split > 1:  # this program accumulates only its share of the value columns (it still scores all of q·k)
        value_dim = o_ref.shape[-1]
        cols = (pl.program_id(head_axis) % v_split) * value_dim + jnp.arange(value_dim, dtype=jnp.int32)
        values = lambda rows: kvn_ref[rows[:, None], cols[None, :]]
    # The blocks up to the query's last used slot (`blocks.py`), or (walk_all) all of them, a static trip count.
    num_blocks = num_k_blocks if walk_all else walked_blocks(idx_ref[...] >= 0, block_k)
    out, lse = normalize(*attend_blocks(idx_ref, qn_ref[...], qr_ref[...], gather, scale=scale, block_k=block_k,
                                        first_block=0, num_blocks=num_blocks, values=values, value_dim=value_dim))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse  # (with v_split, each of a head block's programs writes the same lse)


def _layout(q, kv, indices, v_dim, block_h, block_k):
    """Padded, flattened operands: (qn, qr, kvn, kvr, rows, dims)."""
    b, t, h, d = q.shape
    s, k = kv.shape[1], indices.shape[-1]
    r = d - v_dim
    vp, rp = next_pow2(v_dim), next_pow2(r)
    block_h = min(block_h, next_pow2(h))
    hp = -(-h // block_h) * block_h
    k_blocks = -(-k // block_k)
    # The row holds whole blocks, and a power of two of slots: a program loads all of it to count its walk
    # (`blocks.walked_blocks`), and the Triton lowering's arrays are powers of two. Blocks past K are -1 (not walked).
    kp = next_pow2(k_blocks * block_k)

    def split(x):  # [..., D] -> latent [..., Vp], rope [..., Rp]
        pad = [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x[..., :v_dim], pad + [(0, vp - v_dim)]), jnp.pad(x[..., v_dim:], pad + [(0, rp - r)])

    qn, qr = split(jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0))))
    kvn, kvr = split(kv)
    rows = jnp.where(indices >= 0, indices + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
    rows = jnp.pad(rows.reshape(b * t, k), ((0, 0), (0, kp - k)), constant_values=-1).astype(jnp.int32)
    dims = dict(b=b, t=t, h=h, s=s, vp=vp, rp=rp, hp=hp, kp=kp, k_blocks=k_blocks, block_h=block_h)
    return (qn.reshape(b * t, hp, vp), qr.reshape(b * t, hp, rp), kvn.reshape(b * s, vp), kvr.reshape(b * s, rp),
            rows, dims)


def _specs(dims, per_query_widths, full_widths, v_split=1):
    """BlockSpecs over (query i, head block j // v_split): [rows], then per-(query, head block) tiles, then whole
    flattened-kv arrays."""
    bh, bs = dims["block_h"], dims["b"] * dims["s"]
    return ([pl.BlockSpec((None, dims["kp"]), lambda i, j: (i, 0))]
            + [pl.BlockSpec((None, bh, w), lambda i, j: (i, j // v_split, 0)) for w in per_query_widths]
            + [pl.BlockSpec((bs, w), lambda i, j: (0, 0)) for w in full_widths])


def _grid(dims, head_major, *spec_lists, v_split=1):
    """(grid, spec_lists) of a (query, head block) kernel (v_split programs per head block: j // v_split).

    The first grid axis is CUDA's x, launched fastest. head_major puts the head blocks there, so a
    query's head-block programs run side by side and all but the first find its gathered rows in
    L2; query-major (the order first measured) runs every query of one head block before the next,
    so where the KV outgrows L2 each head block gathers the rows from HBM again (H/block_h times
    the traffic: 4x at H = 128, block_h = 32; 9.4 MB per query, ~60 FLOP/B in the forward).
    """
    grid = (dims["b"] * dims["t"], dims["hp"] // dims["block_h"] * v_split)
    if not head_major:
        return grid, spec_lists
    swap = lambda spec: pl.BlockSpec(spec.block_shape, lambda j, i: spec.index_map(i, j))
    return grid[::-1], tuple([swap(spec) for spec in specs] for specs in spec_lists)


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_h", "block_k", "num_warps", "num_stages",
                                             "head_major", "v_split", "walk_all", "interpret"))
def sparse_mla_fwd(q, kv, indices, *, scale, v_dim, block_h=32, block_k=64, num_warps=4, num_stages=2,
                   head_major=True, v_split=1, walk_all=False, interpret=False):
    """q [B,T,H,D], kv [B,S,D], indices [B,T,K] -> (out [B,T,H,v_dim] in q's dtype, lse [B,T,H] f32).

    head_major: the launch order of the (query, head block) programs (`_grid`).
    v_split: programs per (query, head block), each accumulating 1/v_split of the value columns and
    all computing the scores (module docstring).
    walk_all: walk every index block, a static trip count, not only those up to the query's last
    used slot (same output): the form timed before 2026-11-30, kept as bench_kernels' same-run
    baseline (":all"). Compiled offline (experiments/triton_static.py, 2026-11-30), the default
    tile spills 188 B with the data-dependent trip count (23 spill accesses in the loop) against
    200 B (29) with the static one. The backward kernels always stop at the last used slot
    (fused 32:32:8:2: 296 B of spills, 23 in the loop, against 248 B and 22 before).
    """
    qn, qr, kvn, kvr, rows, dims = _layout(q, kv, indices, v_dim, block_h, block_k)
    b, t, h, hp, vp, block_h = (dims[n] for n in ("b", "t", "h", "hp", "vp", "block_h"))
    if v_split < 1 or vp % v_split or vp // v_split < 16:
        raise ValueError(f"sparse_mla_fwd: v_split must divide the padded value dim {vp} into parts of >= 16, "
                         f"got {v_split}")
    kernel = functools.partial(_kernel, scale=scale, block_k=block_k, num_k_blocks=dims["k_blocks"], v_split=v_split,
                               head_axis=0 if head_major else 1, walk_all=walk_all)
    vw = vp // v_split
    grid, (in_specs, out_specs) = _grid(dims, head_major, _specs(dims, (vp, dims["rp"]), (vp, dims["rp"]), v_split),
                                        [pl.BlockSpec((None, block_h, vw), lambda i, j: (i, j // v_split, j % v_split)),
                                         pl.BlockSpec((None, block_h), lambda i, j: (i, j // v_split))],
                                        v_split=v_split)
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b * t, hp, vp), q.dtype), jax.ShapeDtypeStruct((b * t, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_mla_fwd",
    )(rows, qn, qr, kvn, kvr)
    out = out.reshape(b, t, hp, vp)[:, :, :h, :v_dim]
    return out, lse.reshape(b, t, hp)[:, :, :h]


def _block_grads(qn, qr, do, lse, delta, kn, kr, used, scale):
    """(p, ds) [Hb, bk] of one block of gathered rows: p recomputed from the saved lse (-inf: a query that
    selected nothing, p = 0), ds = P ⊙ (dO·Vᵀ − Δ) · scale in the rows' dtype."""
    finite = lse > -jnp.inf
    s = (jnp.dot(qn, kn.T, preferred_element_type=jnp.float32)
         + jnp.dot(qr, kr.T, preferred_element_type=jnp.float32)) * scale
    p = jnp.where(used[None, :] & finite[:, None], jnp.exp(s - jnp.where(finite, lse, 0.0)[:, None]), 0.0)
    dp = jnp.dot(do, kn.T, preferred_element_type=jnp.float32)
    return p, (p * (dp - delta[:, None]) * scale).astype(kn.dtype)


def _gather_block(idx_ref, kvn_ref, kvr_ref, i, block_k):
    """(idx, used, latent rows, rope rows) of index block i (unused slots read row 0)."""
    idx, used, rows = _index_block(idx_ref, i, block_k)
    return idx, used, kvn_ref[rows, :], kvr_ref[rows, :]


def _add_rows(dkvn_ref, dkvr_ref, idx, used, dkn, dkr):
    """Atomically adds the row gradients dkn [bk, Vp], dkr [bk, Rp] into rows idx of the float32 dkv."""
    # Unused slots add their (zero) rows into a spare last row rather than under a mask, and the
    # indices are whole arrays: the forms interpret mode can also run.
    target = jnp.where(used, idx, dkvn_ref.shape[0] - 1)
    for ref, val in ((dkvn_ref, dkn), (dkvr_ref, dkr)):
        cols = jnp.broadcast_to(jnp.arange(val.shape[1], dtype=jnp.int32)[None, :], val.shape)
        plgpu.atomic_add(ref, (jnp.broadcast_to(target[:, None], val.shape), cols), val)


def _bwd_kernel(idx_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref, kvn_ref, kvr_ref, *refs, scale, block_k,
                with_dkv):
    """Grid (query, head block): dq of the block's heads and, with_dkv, their share of each row's dkv."""
    if with_dkv:
        _, _, dqn_ref, dqr_ref, dkvn_ref, dkvr_ref = refs  # the first two alias the dkv outputs
    else:
        dqn_ref, dqr_ref = refs
    qn, qr, do = qn_ref[...], qr_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(i, carry):
        dqn, dqr = carry
        idx, used, kn, kr = _gather_block(idx_ref, kvn_ref, kvr_ref, i, block_k)
        p, ds = _block_grads(qn, qr, do, lse, delta, kn, kr, used, scale)
        if with_dkv:
            _add_rows(dkvn_ref, dkvr_ref, idx, used,
                      jnp.dot(ds.T, qn, preferred_element_type=jnp.float32)
                      + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32),
                      jnp.dot(ds.T, qr, preferred_element_type=jnp.float32))
        return (dqn + jnp.dot(ds, kn, preferred_element_type=jnp.float32),
                dqr + jnp.dot(ds, kr, preferred_element_type=jnp.float32))

    init = (jnp.zeros(qn.shape, jnp.float32), jnp.zeros(qr.shape, jnp.float32))
    dqn, dqr = jax.lax.fori_loop(0, walked_blocks(idx_ref[...] >= 0, block_k), body, init)
    dqn_ref[...] = dqn.astype(dqn_ref.dtype)
    dqr_ref[...] = dqr.astype(dqr_ref.dtype)


def _bwd_dkv_kernel(idx_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref, kvn_ref, kvr_ref, _dkvn_in, _dkvr_in,
                    dkvn_ref, dkvr_ref, *, scale, block_h, block_k):
    """Grid (query,): each block of rows' dkv summed over all heads, block_h at a time, then one atomic add."""
    heads = qn_ref.shape[0]

    def body(i, carry):
        idx, used, kn, kr = _gather_block(idx_ref, kvn_ref, kvr_ref, i, block_k)

        def head_block(j, acc):  # a loop, not unrolled: one set of shared-memory buffers for every head block
            dkn, dkr = acc
            hs = pl.ds(pl.multiple_of(j * block_h, block_h), block_h)
            qn, qr, do = qn_ref[hs, :], qr_ref[hs, :], do_ref[hs, :]  # re-read per row block (L1/L2)
            p, ds = _block_grads(qn, qr, do, lse_ref[hs], delta_ref[hs], kn, kr, used, scale)
            return (dkn + jnp.dot(ds.T, qn, preferred_element_type=jnp.float32)
                    + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32),
                    dkr + jnp.dot(ds.T, qr, preferred_element_type=jnp.float32))

        init = (jnp.zeros(kn.shape, jnp.float32), jnp.zeros(kr.shape, jnp.float32))
        _add_rows(dkvn_ref, dkvr_ref, idx, used, *jax.lax.fori_loop(0, heads // block_h, head_block, init))
        return carry

    jax.lax.fori_loop(0, walked_blocks(idx_ref[...] >= 0, block_k), body, 0)


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_h", "block_k", "num_warps", "num_stages",
                                             "split_dkv", "head_major", "interpret"))
def sparse_mla_bwd(q, kv, indices, out, lse, d_out, *, scale, v_dim, block_h=32, block_k=32, num_warps=8,
                   num_stages=2, split_dkv=False, head_major=True, interpret=False):
    """Gradients (dq [B,T,H,D] in q's dtype, dkv [B,S,D] in kv's dtype) of `sparse_mla_fwd`'s output.

    Default tiles: the fastest of those that fit an H200's shared memory (64-row tiles do not).
    Measured there at V3.2 shapes, T=16K: 546 ms, ~43 TFLOP/s, bound by the float32 atomic adds
    of every (query, head block) into the shared rows; 285 ms, 83 TFLOP/s on 2026-11-29 (jax
    0.11.2), with relaxed atomic adds, head-major (285 ms query-major too).
    split_dkv: two kernels instead. The first, grid (query, head block), writes dq only; the second,
    grid (query,), sums each block of rows' gradient over all heads (a loop over head blocks,
    recomputing P and dS) and adds it once: H/block_h times fewer atomic adds (4x at H = 128,
    block_h = 32) for ~40 % more matmul work (P and dS are computed twice). Slower on the H200 at
    T=16K: 324 ms against the fused kernel's 285 (2026-11-29), so off by default.
    head_major: the launch order of the (query, head block) kernel (`_grid`); the 546 ms above
    was query-major.
    """
    qn, qr, kvn, kvr, rows, dims = _layout(q, kv, indices, v_dim, block_h, block_k)
    b, t, h, s, hp, vp, rp, kp, block_h = (dims[n] for n in ("b", "t", "h", "s", "hp", "vp", "rp", "kp", "block_h"))
    pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, hp - h)] + [(0, 0)] * (x.ndim - 3))
    do = pad_heads(jnp.pad(d_out, [(0, 0)] * 3 + [(0, vp - v_dim)])).reshape(b * t, hp, vp).astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # Δ = rowsum(dO ⊙ O)
    delta = pad_heads(delta).reshape(b * t, hp)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, hp - h)), constant_values=-jnp.inf).reshape(b * t, hp)
    operands = (rows, qn, qr, do, lse, delta, kvn, kvr)
    # dkv accumulates in float32 with one spare row (index b·s) that takes the unused slots.
    zeros = (jnp.zeros((b * s + 1, vp), jnp.float32), jnp.zeros((b * s + 1, rp), jnp.float32))
    dkv_shapes = [jax.ShapeDtypeStruct((b * s + 1, w), jnp.float32) for w in (vp, rp)]
    dq_shapes = [jax.ShapeDtypeStruct((b * t, hp, w), q.dtype) for w in (vp, rp)]
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    dkv_name = "sparse_mla_bwd_dkv" if split_dkv else "sparse_mla_bwd"  # the kernel that adds into dkv
    relax_atomic_adds(dkv_name)  # dkv is read only after the kernel: its adds need no ordering
    if interpret:
        exact_interpreted_atomic_adds()  # a row repeated within one block gets every slot's add, as on a GPU
    head_vec = pl.BlockSpec((None, block_h), lambda i, j: (i, j))
    in_specs = _specs(dims, (vp, rp, vp), (vp, rp))
    in_specs = in_specs[:4] + [head_vec, head_vec] + in_specs[4:]
    dq_specs = _specs(dims, (vp, rp), ())[1:]
    dq_kernel = functools.partial(_bwd_kernel, scale=scale, block_k=block_k, with_dkv=not split_dkv)
    if split_dkv:
        grid, (in_specs, dq_specs) = _grid(dims, head_major, in_specs, dq_specs)
        dqn, dqr = pl.pallas_call(dq_kernel, grid=grid, in_specs=in_specs, out_specs=dq_specs, out_shape=dq_shapes,
                                  compiler_params=params, interpret=interpret, name="sparse_mla_bwd_dq")(*operands)
        per_query = lambda *shape: pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))
        whole = [pl.BlockSpec((b * s + n, w), lambda i: (0, 0)) for n in (0, 1) for w in (vp, rp)]
        dkvn, dkvr = pl.pallas_call(
            functools.partial(_bwd_dkv_kernel, scale=scale, block_h=block_h, block_k=block_k),
            grid=(b * t,),
            in_specs=[per_query(kp), per_query(hp, vp), per_query(hp, rp), per_query(hp, vp), per_query(hp),
                      per_query(hp)] + whole,
            out_specs=whole[2:],
            out_shape=dkv_shapes,
            input_output_aliases={8: 0, 9: 1},
            compiler_params=params,
            interpret=interpret,
            name=dkv_name,
        )(*operands, *zeros)
    else:
        dkv_specs = [pl.BlockSpec((b * s + 1, w), lambda i, j: (0, 0)) for w in (vp, rp)]
        grid, (in_specs, out_specs) = _grid(dims, head_major, in_specs + dkv_specs, dq_specs + dkv_specs)
        dqn, dqr, dkvn, dkvr = pl.pallas_call(
            dq_kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=dq_shapes + dkv_shapes,
            input_output_aliases={8: 2, 9: 3},
            compiler_params=params,
            interpret=interpret,
            name=dkv_name,
        )(*operands, *zeros)
    r = q.shape[-1] - v_dim
    dq = jnp.concatenate([dqn.reshape(b, t, hp, vp)[:, :, :h, :v_dim], dqr.reshape(b, t, hp, rp)[:, :, :h, :r]], -1)
    dkv = jnp.concatenate([dkvn[:-1].reshape(b, s, vp)[..., :v_dim], dkvr[:-1].reshape(b, s, rp)[..., :r]], -1)
    return dq, dkv.astype(kv.dtype)
