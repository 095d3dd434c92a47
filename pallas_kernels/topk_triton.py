"""Exact top-k of float32 rows as one Pallas kernel (Triton lowering, GPU): `select_topk` fused, a program per row.

`select_topk_triton(scores [..., S], k) -> int32 [..., k]` returns for each row the indices of its
k largest scores: the same indices in the same order as `pallas_kernels.topk.select_topk`
(lax.top_k's set, ties to the lowest index, listed by ascending index; -inf never selected, -1 in
the slots past a row's finite scores).

Why a kernel: `select_topk` is ~45 small XLA kernels per call; on an H200 it took 0.5 ms per
[512, 64K] chunk (0.27 TB/s, far from HBM's 4.3), ~64 ms of the 64K indexer's 265 ms. Here a
program does the whole row: the sampled bound, the candidate compaction and the exact select,
with the row read about 1.5 times (the every-16th-key sample touches half of its 32-byte sectors).

The algorithm is select_topk's (see its module docstring for the bounds), on the uint32 order keys
(`topk.sortable_key`), one bit per counting pass (a pass is one compare and one block sum per key,
where 15-way 4-bit passes would cost 15):
1. lo = the 20-bit radix select of the rank-r key among every 16th key (`topk.sample_plan`);
2. one pass over the row writes the keys >= lo and their positions, in index order (a block
   cumsum gives each its slot), into a per-row buffer in global memory (L2-resident: ~2.3·k);
3. where the buffer holds the exact answer (at most `buffer` candidates and at least kk of them,
   or lo is the lowest finite key) the exact select runs over the buffer, else over the row (heavy
   ties, adversarial rows: exact, only slower);
4. exact select: the kk-th largest key t (32 passes), then one pass writes, in index order, the
   positions of the keys > t and of the first kk - #{> t} keys == t, and -1 in the slots after.
Rows too short to sample (S < 2·buffer) take step 4 over the row directly.

A masked scatter store writes no lane on the GPU, but interpret mode writes every lane (the
masked ones with the old value), so masked lanes aim at a dump slot, the last entry of the buffer
and of out, where they cannot collide with a real write. Blocks at static starts lie inside their
refs (JAX 0.12 checks at trace time): out holds whole blocks of -1 stores, and a row shorter than
its block is padded to one.

Not yet compiled by XLA or timed on a GPU. Offline for sm_90a (`experiments/triton_static.py`,
[512, 64K], k = 2048): 128 registers per thread at 8 warps, no spills, 16 KiB of shared memory,
2 programs per SM. Expected cost per 64K row: ~8K instructions per thread (the row pass with its
block cumsums most of it) and ~1.5 row reads, i.e. a few ms for all rows of a 64K prefill, where
select_topk took ~64 ms; `experiments/bench_kernels.py` times it against select_topk.

Shapes: R rows, n = S scores per row, k outputs (kk = min(k, n)), buffer candidate slots.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiles import next_pow2
from pallas_kernels.topk import (
    MIN_FINITE_KEY,
    SAMPLE_BITS,
    SAMPLE_STRIDE,
    sample_plan,
    sortable_key,
)

BLOCK = 4096       # row keys per step of a pass (16 per thread at 8 warps)
MAX_BLOCK = 8192   # the sample and the buffer are read in blocks of up to this many keys (32 per thread)


def _iota(n):
    return jnp.arange(n, dtype=jnp.int32)


def _hoisted(load, nblocks):
    """A source whose only block is loaded once, outside the passes that read it again and again."""
    if nblocks != 1:
        return load, nblocks
    block = load(0)
    return (lambda j: block), 1


def _count(load, nblocks, pred):
    """int32: Σ over the blocks of the source of #{keys where pred(keys)}."""
    total = lambda keys: jnp.sum(pred(keys).astype(jnp.int32))
    if nblocks == 1:
        return total(load(0)[0])
    return jax.lax.fori_loop(0, nblocks, lambda j, c: c + total(load(j)[0]), jnp.int32(0))


def _kth_key(load, nblocks, kk, bits):
    """The largest multiple t of 2^(32 - bits) with #{keys >= t} >= kk (0 if fewer than kk keys), a bit per pass."""

    def step(i, prefix):
        cand = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(_count(load, nblocks, lambda keys: keys >= cand) >= kk, cand, prefix)

    return jax.lax.fori_loop(0, bits, step, jnp.uint32(0))


def _emit(load, nblocks, kk, o_ref, k):
    """Writes the positions of the source's kk largest keys (ties: first in source order) in source order, then -1
    up to slot k.

    load(j) -> (keys [block] uint32, positions [block] int32) of block j, ascending positions,
    filler keys below MIN_FINITE_KEY (never selected).
    """
    dump = o_ref.shape[0] - 1
    load, nblocks = _hoisted(load, nblocks)
    t = jnp.maximum(_kth_key(load, nblocks, kk, 32), MIN_FINITE_KEY)  # never select -inf or filler
    need = kk - _count(load, nblocks, lambda keys: keys > t)  # ties to take, first ones first

    def body(j, carry):
        taken, ties = carry
        keys, pos = load(j)
        eq = (keys == t).astype(jnp.int32)
        take = (keys > t) | ((eq > 0) & (ties + jnp.cumsum(eq) - eq < need))
        slot = taken + jnp.cumsum(take.astype(jnp.int32)) - 1
        plgpu.store(o_ref.at[jnp.where(take, slot, dump)], pos, mask=take)
        return taken + jnp.sum(take.astype(jnp.int32)), ties + jnp.sum(eq)

    zero = jnp.int32(0)
    taken = body(0, (zero, zero))[0] if nblocks == 1 else jax.lax.fori_loop(0, nblocks, body, (zero, zero))[0]
    out_block = _out_block(k)
    for start in range(0, k, out_block):  # the slots past the selection (disjoint from the writes above)
        slots = start + _iota(out_block)
        plgpu.store(o_ref.at[pl.ds(start, out_block)], jnp.full((out_block,), -1, jnp.int32),
                    mask=(slots >= taken) & (slots < k))


def _out_block(k):
    """Output slots per -1 store; the output holds whole blocks of them (`_emit`'s stores have static starts)."""
    return min(next_pow2(k), BLOCK)


def _kernel(x_ref, o_ref, bkey_ref, bpos_ref, *, n, k, kk, block, plan, sample_block, buffer_block, interpret):
    def row(j):  # keys and positions of row block j; -inf past n
        pos = j * block + _iota(block)
        x = plgpu.load(x_ref.at[pl.ds(j * block, block)], mask=pos < n, other=-jnp.inf)
        return sortable_key(x), pos

    row_blocks = -(-n // block)
    if plan is None:
        _emit(row, row_blocks, kk, o_ref, k)
        return
    rank, buffer = plan

    def sample(j):  # every SAMPLE_STRIDE-th key
        pos = (j * sample_block + _iota(sample_block)) * SAMPLE_STRIDE
        valid = pos < n
        x = plgpu.load(x_ref.at[jnp.where(valid, pos, 0)], mask=valid, other=-jnp.inf)
        return sortable_key(x), pos

    samples = -(-n // SAMPLE_STRIDE)
    sample_load, sample_blocks = _hoisted(sample, -(-samples // sample_block))
    lo = jnp.maximum(_kth_key(sample_load, sample_blocks, rank, SAMPLE_BITS), MIN_FINITE_KEY)

    def compact(j, count):  # keys >= lo into the buffer, in index order
        keys, pos = row(j)
        cand = (keys >= lo).astype(jnp.int32)
        slot = count + jnp.cumsum(cand) - 1
        keep = (cand > 0) & (slot < buffer)
        dst = jnp.where(keep, slot, bkey_ref.shape[0] - 1)
        plgpu.store(bkey_ref.at[dst], keys, mask=keep)
        plgpu.store(bpos_ref.at[dst], pos, mask=keep)
        return count + jnp.sum(cand)

    count = jax.lax.fori_loop(0, row_blocks, compact, jnp.int32(0))
    if not interpret:  # (no barrier in interpret mode: it runs a program's lanes as one array op)
        plgpu.debug_barrier()  # the buffer was written by every thread of the program; read it back whole

    def from_buffer(j):
        slots = j * buffer_block + _iota(buffer_block)
        used = slots < jnp.minimum(count, buffer)
        at = pl.ds(j * buffer_block, buffer_block)
        return (plgpu.load(bkey_ref.at[at], mask=used, other=np.uint32(0)),  # key 0: below every float's
                plgpu.load(bpos_ref.at[at], mask=used, other=0))

    exact = (count <= buffer) & ((count >= kk) | (lo == MIN_FINITE_KEY))

    @pl.when(exact)
    def _():
        _emit(from_buffer, -(-buffer // buffer_block), kk, o_ref, k)

    @pl.when(jnp.logical_not(exact))
    def _():
        _emit(row, row_blocks, kk, o_ref, k)


@functools.partial(jax.jit, static_argnames=("k", "block", "max_block", "num_warps", "interpret"))
def select_topk_triton(scores, k, *, block=BLOCK, max_block=MAX_BLOCK, num_warps=8, interpret=False):
    """int32 [..., k]: indices of the k largest of each row of scores [..., S] (module docstring).

    block: row keys per step of a pass; max_block: the sample's and the buffer's (a single block is loaded
    once for all passes); num_warps: the program's warps.
    """
    if k < 1:
        raise ValueError(f"select_topk_triton: k must be >= 1, got {k}")
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"select_topk_triton: scores must have a non-empty last axis, got shape {scores.shape}")
    lead, n = scores.shape[:-1], scores.shape[-1]
    for name, size in (("block", block), ("max_block", max_block)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"select_topk_triton: {name} must be a power of two >= 16, got {size}")
    kk = min(k, n)
    block = min(block, next_pow2(n))
    plan = sample_plan(n, kk)
    buffer = plan[1] if plan else 0
    sample_block = min(next_pow2(-(-n // SAMPLE_STRIDE)), max_block)
    buffer_block = min(next_pow2(buffer), max_block)
    buffer_slots = -(-buffer // buffer_block) * buffer_block + 1  # + the dump slot
    out_block = _out_block(k)
    out_slots = -(-k // out_block) * out_block + 1  # + the dump slot
    # A row of one block is read at a static start, so it is padded with -inf to the block (module docstring);
    # longer rows are read at traced starts with the tail masked, not copied.
    x = scores.reshape(-1, n).astype(jnp.float32)
    x = jnp.pad(x, ((0, 0), (0, max(block - n, 0))), constant_values=-jnp.inf)
    rows = x.shape[0]
    row_spec = lambda width: pl.BlockSpec((None, width), lambda i: (i, 0))
    out, _, _ = pl.pallas_call(
        functools.partial(_kernel, n=n, k=k, kk=kk, block=block, plan=plan, sample_block=sample_block,
                          buffer_block=buffer_block, interpret=interpret),
        grid=(rows,),
        in_specs=[row_spec(x.shape[1])],
        out_specs=[row_spec(out_slots), row_spec(buffer_slots), row_spec(buffer_slots)],
        out_shape=[jax.ShapeDtypeStruct((rows, out_slots), jnp.int32),
                   jax.ShapeDtypeStruct((rows, buffer_slots), jnp.uint32),
                   jax.ShapeDtypeStruct((rows, buffer_slots), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="select_topk",
    )(x)
    return out[:, :k].reshape(lead + (k,))
