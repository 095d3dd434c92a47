"""Lightning-indexer scores as a Mosaic GPU Pallas kernel (Hopper: TMA, wgmma, warp specialisation).

Same tiles as the Triton key-loop kernel (`pallas_kernels/indexer/triton.py`): for the queries of
a program, every key block they see, I[t, s] = k_scale[s] · Σ_h w[t, h] · relu(q[t, h] · k[s]) in
float32, -inf outside s <= t + q_offset and s < k_len, written to a [B, Tc, S] score chunk that the
top-k kernel reads. Why a second kernel: the indexer is a dense causal GEMM with a CUDA-core
epilogue (ReLU, weighted head sum), and the Triton one reaches ~414 TFLOP/s on an H200 (52 % of
the measured bf16 peak) with the epilogue serialised behind each matmul. Here, as in FlashAttention 3,
one CTA holds three warpgroups:
- a producer (40 registers) streams key tiles [block_s, D] and their scales by TMA into a ring of
  `num_stages` shared-memory slots, each guarded by a "loaded" and a "consumed" barrier;
- two consumers each own `block_t` queries (their q [block_t·H, D] and w stay in shared memory /
  registers) and, per key block, issue one wgmma for all of them (keys x (query, head): A = the
  key tile, B = qᵀ, accumulator [block_s, block_t·H] float32; N <= 256, so up to 4 queries at
  H = 64; one wgmma per query read the key tile from shared memory block_t times), so each key's
  head sum runs along its accumulator row, within a thread and a quad. With `pingpong` (default)
  they take turns, as FlashAttention 3's schedule barrier does: a consumer issues its matmuls only
  once the other has issued its own, so one runs its epilogue while the tensor core serves the
  other (without it the two start together and would stay in step, epilogues overlapping each
  other rather than the matmuls). Both read the same key tile, so a key is read from L2 once per
  2·block_t queries.
- a consumer writes its [block_t, block_s] scores through shared memory by TMA (double-buffered),
  and -inf into the blocks past the CTA's last visible key, which are neither loaded nor scored.
The trip count is per CTA, from the positions (`_key_steps`): a causal chunk's early query tiles
load fewer key blocks.

bf16/f16 and fp8 e4m3 inputs (Hopper's fp8 wgmma: both operands K-major, as here); float32 is the
Triton kernel's. Heads are padded to a multiple of 16, D to a whole swizzle row (64 bf16, 128 fp8
elements: no copy at V3.2's D = 128); S to whole key blocks (no copy at whole chunks of queries).

Untimed: written without a GPU (2026-11-30). Checked here under Mosaic GPU's interpreter
(`plgpu` kernels run on CPU with simulated shared memory, TMA and barriers) against the reference,
and lowered for CUDA (tests/pallas_kernels/test_indexer_mosaic_gpu.py);
experiments/bench_kernels.py times it beside the Triton kernel (configs ending in ":mgpu").

Shapes: B batch, Tc queries in the chunk, S keys, H heads, D head dim.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_T, BLOCK_S, NUM_STAGES = 2, 128, 3  # queries per consumer, keys per step, ring slots
_CONSUMERS = 2
_MAX_N = 256  # wgmma's largest N
ROW = plgpu.Layout.WGMMA.reduce(1)  # a [block_s] vector along the accumulator's rows (one value per key)
COL = plgpu.Layout.WGMMA.reduce(0)  # a [H] vector along its columns (one value per head)
# JAX 0.10's plgpu.load takes the index as a positional argument (0.11 deprecates it for ref.at[...]), and
# 0.10's GPU interpreter has no rule for it nor for layout casts (layouts mean nothing there).
_LOAD_IDX = inspect.signature(plgpu.load).parameters.get("idx")  # JAX 0.12 has none
JAX_010 = _LOAD_IDX is not None and _LOAD_IDX.default is inspect.Parameter.empty


def check_operands(caller, q, k, block_s, **counts):
    """Raises a ValueError unless q [B, T, H, D] and k are one wgmma dtype (bf16, f16, fp8 e4m3), H padded at most
    256 (wgmma's N), block_s a multiple of 64 (wgmma's M) and each of `counts` (tile counts) at least 1."""
    if q.dtype != k.dtype or jnp.dtype(q.dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn)):
        raise ValueError(f"{caller}: q and the keys must both be bf16, f16 or float8_e4m3fn (wgmma operands), got "
                         f"{q.dtype} and {k.dtype}")
    if padded_heads(q.shape[2]) > _MAX_N:
        raise ValueError(f"{caller}: at most {_MAX_N} heads (wgmma's N), got {q.shape[2]}")
    if block_s % 64 or min(counts.values()) < 1:
        raise ValueError(f"{caller}: block_s must be a multiple of 64 (wgmma's M) and "
                         f"{', '.join(counts)} >= 1; got block_s={block_s}, "
                         + ", ".join(f"{name}={value}" for name, value in counts.items()))


def padded_heads(h):
    """Heads padded to a multiple of 16 (wgmma's N; padded heads weigh 0)."""
    return -(-h // 16) * 16


def load_in_layout(ref, layout, interpreted):
    """ref's array in `layout` (a plain read under JAX 0.10's interpreter)."""
    if not JAX_010:
        return plgpu.load(ref, layout=layout)
    return ref[...] if interpreted else plgpu.load(ref, (), layout=layout)


def in_layout(x, layout, interpreted):
    """x cast to `layout` (no cast under JAX 0.10's interpreter)."""
    return x if interpreted and JAX_010 else plgpu.layout_cast(x, layout)


def transposed(ref):
    """ref [N, K] as the wgmma B operand [K, N] (K-major; fp8 wgmma takes no other)."""
    return plgpu.transpose_ref(ref, (1, 0)) if JAX_010 else ref.transpose((1, 0))  # 0.11 deprecates transpose_ref


def smem_transforms(dtype):
    """Tiling and 128-byte swizzle of a [rows, D] wgmma operand in shared memory."""
    swizzle = 128
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def query_weights(w_smem, block_s, interpreted):
    """Each query's head weights (w_smem [T, H] float32) broadcast along a tile's block_s keys: [block_s, H] each."""
    t, hp = w_smem.shape
    return [jax.lax.broadcast_in_dim(load_in_layout(w_smem.at[i], COL, interpreted), (block_s, hp), [1])
            for i in range(t)]


def fill_masked(ninf_smem, interpreted):
    """ninf_smem [T, block_s] = -inf, for the blocks past every limit (in the scores' layout: a splat stores only
    in multiples of 128 elements)."""
    t, block_s = ninf_smem.shape
    for i in range(t):
        ninf_smem[i] = in_layout(jnp.full((block_s,), -jnp.inf, jnp.float32), ROW, interpreted)


def block_logits(k_tile, q_tile, heads, after_issue=None):
    """Logits [block_s, heads] float32 of the key tile (smem [block_s, D]) against each query's heads (q_tile: smem
    [queries · heads, D], query-major), as a list per query; after_issue runs once the matmuls are issued, before
    their results are read.

    As few wgmmas as wgmma's N allows (<= 256 columns: one at V3.2's 64 heads and up to 4 queries), not one per
    query: each wgmma reads the key tile from shared memory again, and a wide N runs at a better rate.
    """
    block_s, n = k_tile.shape[0], q_tile.shape[0]
    width = _MAX_N // heads * heads
    starts = range(0, n, width)

    def run(*acc_refs):
        for acc, start in zip(acc_refs, starts, strict=True):
            plgpu.wgmma(acc, k_tile, transposed(q_tile if len(starts) == 1 else q_tile.at[pl.ds(start, acc.shape[1])]))
        if after_issue is not None:
            after_issue()
        accs = [acc[...] for acc in acc_refs]
        split = [divmod(i * heads, width) for i in range(n // heads)]  # (wgmma, first column) of each query
        return [accs[c][:, col:col + heads] for c, col in split]

    return pl.run_scoped(run, *[plgpu.ACC((block_s, min(width, n - start)), jnp.float32) for start in starts])


def produce_keys(steps, num_stages, rows, k_ref, ks_ref, k_smem, ks_smem, loaded, consumed):
    """The producer: key block `rows(step)` (an index of k_ref's leading dims and key rows) of k_ref, and its
    scales of ks_ref unless None, into slot step % num_stages for step in [0, steps), each once the consumers
    released the block the slot held; then it waits out each slot's last release (no barrier phase is left
    unobserved)."""
    @pl.loop(0, steps)
    def _load(step):
        slot = jax.lax.rem(step, num_stages)

        @pl.when(step >= num_stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[rows(step)], k_smem.at[slot], loaded.at[slot])
        if ks_ref is not None:
            plgpu.copy_gmem_to_smem(ks_ref.at[rows(step)], ks_smem.at[slot], loaded.at[slot])

    @pl.loop(jnp.maximum(steps - num_stages, 0), steps)
    def _drain(step):
        plgpu.barrier_wait(consumed.at[jax.lax.rem(step, num_stages)])


def store_masked(ninf_smem, start, stop, dst):
    """-inf (ninf_smem, `fill_masked`) into dst(step) for step in [start, stop): the blocks past every query's
    limit, neither loaded nor scored; then waits for every store of the consumer."""
    plgpu.commit_smem()

    @pl.loop(start, stop)
    def _(step):
        plgpu.copy_smem_to_gmem(ninf_smem, dst(step))
        plgpu.wait_smem_to_gmem(8, wait_read_only=True)

    plgpu.wait_smem_to_gmem(0)


def store_scores(o_smem, step, accs, weights, k_scale, keys, limits, dst):
    """Writes one tile's scores to dst (GMEM [T, block_s]) through slot step % 2 of o_smem [2, T, block_s]:
    k_scale · Σ_h w·relu(logits) per query (accs[t] [block_s, H]), -inf where keys[s] >= limits[t]."""
    slot = jax.lax.rem(step, 2)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last read this slot is done
    for t, (acc, w, limit) in enumerate(zip(accs, weights, limits, strict=True)):
        scores = jnp.sum(jnp.maximum(acc, 0.0) * w, axis=1)
        scores = scores if k_scale is None else scores * k_scale
        o_smem[slot, t] = jnp.where(keys < limit, scores, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[slot], dst)


def _scores_kernel(steps_ref, limit_ref, q_ref, w_ref, k_ref, ks_ref, out_ref, *, block_t, block_s, num_stages,
                   pingpong, interpreted):
    """Grid (tiles, B), 3 warpgroups: consumers 0 and 1 (block_t queries each), the producer 2 (module docstring)."""
    b, tile = jax.lax.axis_index("batch"), jax.lax.axis_index("tile")
    hp, d = w_ref.shape[2], q_ref.shape[2]
    num_blocks = out_ref.shape[2] // block_s
    steps = steps_ref[b, tile]  # key blocks any of the CTA's queries sees
    transforms = smem_transforms(k_ref.dtype)

    def body(q_smem, w_smem, k_smem, ks_smem, o_smem, ninf_smem, q_barrier, k_barriers, consumed, turns):
        wg = jax.lax.axis_index("wg")

        def take_turns():  # both consumers meet here (pingpong): one has issued its matmuls, the other may now
            if pingpong:
                plgpu.barrier_arrive(turns)
                plgpu.barrier_wait(turns)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            first = (tile * _CONSUMERS + wg) * block_t  # this consumer's first query
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(first * hp, block_t * hp)], q_smem.at[wg], q_barrier.at[wg])
            plgpu.copy_gmem_to_smem(w_ref.at[b, pl.ds(first, block_t)], w_smem.at[wg], q_barrier.at[wg])
            limits = [limit_ref[b, first + t] for t in range(block_t)]
            fill_masked(ninf_smem.at[wg], interpreted)
            plgpu.barrier_wait(q_barrier.at[wg])
            weights = query_weights(w_smem.at[wg], block_s, interpreted)
            keys = in_layout(jax.lax.iota(jnp.int32, block_s), ROW, interpreted)
            pl.when(wg == 1)(take_turns)  # consumer 1 runs half a step behind consumer 0

            dst = lambda step: out_ref.at[b, pl.ds(first, block_t), pl.ds(step * block_s, block_s)]

            @pl.loop(0, steps)
            def _step(step):
                slot = jax.lax.rem(step, num_stages)
                plgpu.barrier_wait(k_barriers.at[slot])
                # take_turns: the other consumer's epilogue ran during these matmuls; now it issues its own.
                accs = block_logits(k_smem.at[slot], q_smem.at[wg], hp, take_turns)
                k_scale = load_in_layout(ks_smem.at[slot], ROW, interpreted)
                plgpu.barrier_arrive(consumed.at[slot])  # the slot's key tile and scales are in registers now
                store_scores(o_smem.at[wg], step, accs, weights, k_scale, keys + step * block_s, limits, dst(step))

            pl.when(wg == 0)(take_turns)  # consumer 1's last turn
            store_masked(ninf_smem.at[wg], steps, num_blocks, dst)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            produce_keys(steps, num_stages, lambda step: (b, pl.ds(step * block_s, block_s)), k_ref, ks_ref, k_smem,
                         ks_smem, k_barriers, consumed)

    pl.run_scoped(
        body,
        plgpu.SMEM((_CONSUMERS, block_t * hp, d), q_ref.dtype, transforms=transforms),
        plgpu.SMEM((_CONSUMERS, block_t, hp), jnp.float32),
        plgpu.SMEM((num_stages, block_s, d), k_ref.dtype, transforms=transforms),
        plgpu.SMEM((num_stages, block_s), jnp.float32),
        plgpu.SMEM((_CONSUMERS, 2, block_t, block_s), jnp.float32),
        plgpu.SMEM((_CONSUMERS, block_t, block_s), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=_CONSUMERS),  # q and w of each consumer
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),  # a slot's keys and scales loaded
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=num_stages),  # a slot consumed by both
        plgpu.Barrier(num_arrivals=_CONSUMERS) if pingpong else None,  # the consumers' turns at the tensor core
        collective_axes="wg",
    )


def _key_steps(limit, block_t, block_s):
    """[B, tiles] int32: the key blocks a CTA loads, from the largest limit of its 2·block_t queries."""
    b, tp = limit.shape
    return -(-jnp.max(limit.reshape(b, tp // (_CONSUMERS * block_t), -1), axis=2) // block_s)


def indexer_scores_mosaic_gpu(q, k, w, k_scale, k_len, positions, *, q_offset=0, block_t=BLOCK_T, block_s=BLOCK_S,
                              num_stages=NUM_STAGES, pingpong=True, interpret=False):
    """Scores [B, Tc, S] (float32, -inf where masked) of queries at `positions` [Tc]: `indexer_scores_triton`'s
    contract, for bf16/f16 or fp8 e4m3 q and k (module docstring). pingpong: the consumers take turns at the
    tensor core (a barrier per step, FlashAttention 3's schedule). interpret: run under Mosaic GPU's interpreter
    (CPU)."""
    b, tc, h, d = q.shape
    s = k.shape[1]
    check_operands("indexer_scores_mosaic_gpu", q, k, block_s, block_t=block_t, num_stages=num_stages)
    if pingpong and num_stages < 2:
        raise ValueError("indexer_scores_mosaic_gpu: pingpong needs num_stages >= 2 (consumer 1 still holds a slot "
                         "when consumer 0 asks for the next block)")
    row = 128 // jnp.dtype(q.dtype).itemsize  # elements per swizzled row
    per_cta = _CONSUMERS * block_t
    tp, sp, hp, dp = -(-tc // per_cta) * per_cta, -(-s // block_s) * block_s, padded_heads(h), -(-d // row) * row
    # Each consumer's w [block_t, H] is a TMA destination at w_smem.at[consumer]: 128-byte aligned only if
    # block_t · H · 4 bytes are (odd block_t at H = 16, 48, ...: 16 heads more, of weight 0).
    hp += 16 if block_t * hp % 32 else 0
    q = jnp.pad(q, ((0, 0), (0, tp - tc), (0, hp - h), (0, dp - d)))
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, tp - tc), (0, hp - h)))
    # Padded to whole blocks: the TMA's tiled view of k needs S % 8 == 0 (and its scales rows of 16-byte multiples).
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, dp - d)))
    k_scale = jnp.pad(k_scale.astype(jnp.float32), ((0, 0), (0, sp - s)))
    # Query t sees the keys < limit[b, t]; padded queries none.
    limit = jnp.minimum(positions.astype(jnp.int32)[None, :] + q_offset + 1, k_len.astype(jnp.int32)[:, None])
    limit = jnp.pad(jnp.maximum(limit, 0), ((0, 0), (0, tp - tc)))
    steps = _key_steps(limit, block_t, block_s)
    kernel = plgpu.kernel(
        functools.partial(_scores_kernel, block_t=block_t, block_s=block_s, num_stages=num_stages,
                          pingpong=pingpong, interpreted=bool(interpret)),
        out_type=jax.ShapeDtypeStruct((b, tp, sp), jnp.float32),
        grid=(tp // per_cta, b),
        grid_names=("tile", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        interpret=interpret_params() if interpret else False,
    )
    # q as [B, Tp·H, D]: a consumer's queries are one wgmma operand (`block_logits`).
    return kernel(steps, limit, q.reshape(b, tp * hp, dp), w, k, k_scale)[:, :tc, :s]


def interpret_params():
    """Mosaic GPU's interpreter (simulated shared memory, TMA and barriers); JAX 0.10 does not export it.

    It runs each warpgroup as an XLA:CPU computation whose barrier waits block in host callbacks: with one
    CPU device on 2 cores they can starve the callback threads and hang. Run it with several host devices
    (XLA_FLAGS=--xla_force_host_platform_device_count=8, as tests/conftest.py and experiments/fuzz_kernels.py do).
    """
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import (
            InterpretGPUParams as params,
        )
    return params()
