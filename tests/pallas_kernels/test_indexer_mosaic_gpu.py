"""The Mosaic GPU indexer-scores kernels, prefill (pallas_kernels/indexer/mosaic_gpu.py) and decode
(mosaic_gpu_decode.py): under Mosaic GPU's interpreter (CPU, JAX >= 0.11) each equals its Triton counterpart and,
through indexer_topk_triton / indexer_topk_decode_triton, the reference; they lower for CUDA at V3.2 shapes on any
JAX."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer import mosaic_gpu, mosaic_gpu_decode
from pallas_kernels.indexer.reference import (
    indexer_topk_decode_reference,
    indexer_topk_reference,
)
from pallas_kernels.indexer.triton import indexer_scores_triton, indexer_topk_triton
from pallas_kernels.indexer.triton_decode import (
    indexer_scores_decode_triton,
    indexer_topk_decode_triton,
)
from pallas_kernels.triton_lowering import export_for_cuda
from tests.pallas_kernels.test_indexer import (
    ascending_then_padding,
    random_inputs,
    same_selection,
)

# JAX 0.10's GPU interpreter has no transposed wgmma operand (the kernel's q[t]ᵀ); .ci/run runs them under 0.11.2.
needs_interpreter = pytest.mark.skipif(mosaic_gpu.JAX_010, reason="JAX 0.10's Mosaic GPU interpreter lacks "
                                       "transposed wgmma operands")


@needs_interpreter
@pytest.mark.parametrize("dtype, b, t, s, h, d, q_offset, k_len, tiles", [
    # ragged T (2 CTAs of 4 queries, one padded), S (3 blocks of 64, the last partial), H 12 -> 16, D 64
    (jnp.bfloat16, 1, 7, 150, 12, 64, 0, [150], {"block_t": 2, "block_s": 64, "num_stages": 2}),
    # per-row k_len (0: every block masked, none loaded), q_offset > 0, one slot (no turns), one query per consumer
    (jnp.bfloat16, 2, 6, 130, 16, 64, 100, [130, 0], {"block_t": 1, "block_s": 64, "num_stages": 1, "pingpong": False}),
    # turns with the fewest slots they allow, 4 key blocks per CTA
    (jnp.bfloat16, 1, 8, 256, 16, 64, 250, [256], {"block_t": 2, "block_s": 64, "num_stages": 2}),
    # fp8 with key scales, D 128 (one swizzled row), 128-key blocks, k_len < S
    (jnp.float8_e4m3fn, 2, 5, 300, 8, 128, 200, [300, 170], {"block_t": 2, "block_s": 128, "num_stages": 3}),
    # H 100 -> 112 -> 128 (3 x 112 x 4 bytes of w would misalign the second consumer's TMA): 3 x 128 columns are
    # two wgmmas (256 + 128, wgmma's N <= 256)
    (jnp.bfloat16, 1, 9, 140, 100, 64, 0, [140], {"block_t": 3, "block_s": 64, "num_stages": 2}),
])
def test_scores_equal_the_triton_kernel(dtype, b, t, s, h, d, q_offset, k_len, tiles):
    """Same -inf mask, same scores up to summation order (the Triton kernel in IEEE float32 on the same inputs)."""
    q, k, w, k_scale, kl = random_inputs(b, t, s, h, d, k_len, jnp.float32)
    q, k = q.astype(dtype), k.astype(dtype)
    positions = jnp.arange(t, dtype=jnp.int32)
    got = np.asarray(mosaic_gpu.indexer_scores_mosaic_gpu(q, k, w, k_scale, kl, positions, q_offset=q_offset,
                                                          interpret=True, **tiles))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(indexer_scores_triton(q, k, w, k_scale, kl, positions, q_offset=q_offset, block_t=4,
                                                block_s=16, interpret=True))
    assert got.shape == want.shape == (b, t, s)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)
    assert finite.any() and not np.isfinite(got[1]).any() if k_len[-1] == 0 else finite.any()


@needs_interpreter
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_topk_matches_reference(dtype):
    """indexer_topk_triton(mosaic_gpu=True): causal runs of chunks, per-row k_len, -1 padding past the valid keys."""
    q, k, w, k_scale, kl = random_inputs(2, 12, 140, 8, 64, [140, 5], jnp.float32)
    q, k = q.astype(dtype), k.astype(dtype)
    got = indexer_topk_triton(q, k, w, topk=9, k_scale=k_scale, q_offset=128, k_len=kl, chunk_size=4, segments=2,
                              interpret=True, block_t=1, block_s=64, mosaic_gpu=True, num_stages=2)
    want = indexer_topk_reference(q, k, w, topk=9, k_scale=k_scale, q_offset=128, k_len=kl)
    assert same_selection(np.asarray(got), np.asarray(want), q, k, w, k_scale)
    assert ascending_then_padding(np.asarray(got)) and np.all(np.asarray(got)[1, :, 5:] == -1)


@pytest.mark.parametrize("dtype, t, tiles", [
    (jnp.bfloat16, 1024, {"num_stages": 3}),
    (jnp.float8_e4m3fn, 1024, {"num_stages": 4}),
    (jnp.bfloat16, 1024, {"block_t": 4, "block_s": 64, "num_stages": 3}),
    (jnp.bfloat16, 1024, {"block_t": 1, "block_s": 64, "num_stages": 1, "pingpong": False}),  # a splat of 64 scores
    (jnp.bfloat16, 1001, {}),  # the last run's 1001 keys: padded to whole blocks (TMA tiles k in 8 rows)
])
def test_lowers_for_cuda_at_v32_shapes(dtype, t, tiles):
    """indexer_topk_triton(mosaic_gpu=True) at T ~ 1K queries, 64 heads x 128: one Mosaic GPU call per causal
    run, the top-k kernel after it (lowering only: compiling needs a GPU)."""
    args = (jax.ShapeDtypeStruct((1, t, 64, 128), dtype), jax.ShapeDtypeStruct((1, t, 128), dtype),
            jax.ShapeDtypeStruct((1, t, 64), jnp.float32))
    module = export_for_cuda(lambda q, k, w: indexer_topk_triton(q, k, w, topk=2048, mosaic_gpu=True, **tiles),
                             args).mlir_module()
    assert module.count("custom_call @mosaic_gpu") == 2  # 2 causal runs of 512-query chunks


def test_rejects_float32_and_bad_tiles():
    q, k, w, k_scale, kl = random_inputs(1, 4, 64, 4, 64, [64], jnp.float32)
    run = lambda q, k, **tiles: mosaic_gpu.indexer_scores_mosaic_gpu(q, k, w, k_scale, kl, jnp.arange(4), **tiles)
    with pytest.raises(ValueError, match="bf16, f16 or float8_e4m3fn"):
        run(q, k)
    with pytest.raises(ValueError, match="multiple of 64"):
        run(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), block_s=96)
    with pytest.raises(ValueError, match="pingpong needs num_stages >= 2"):
        run(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), num_stages=1)
    with pytest.raises(ValueError, match="at most 256 heads"):
        mosaic_gpu.indexer_scores_mosaic_gpu(jnp.zeros((1, 4, 257, 64), jnp.bfloat16), k.astype(jnp.bfloat16),
                                             jnp.zeros((1, 4, 257)), k_scale, kl, jnp.arange(4))


def decode_inputs(layers, b, t, s, h, d, dtype, scaled):
    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k_cache = jnp.asarray(rng.normal(size=(layers, b, s, d)), dtype)
    w = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    k_scale = jnp.asarray(rng.uniform(0.5, 2, size=(layers, b, s)), jnp.float32) if scaled else None
    return q, k_cache, w, k_scale


@needs_interpreter
@pytest.mark.parametrize("dtype, t, s, h, d, k_len, scaled, tiles", [
    # S = 296: the last of 5 blocks partial (TMA fills its rows past S with zeros), 2 CTAs per sequence, k_len 0
    (jnp.bfloat16, 1, 296, 12, 64, [[296], [0]], False, {"block_s": 64, "blocks": 3, "num_stages": 2}),
    # fp8 with key scales, two queries (MTP), k_len below one block and mid-span, one slot
    (jnp.float8_e4m3fn, 2, 520, 12, 128, [[520, 37], [5, 250]], True, {"block_s": 128, "blocks": 3, "num_stages": 1}),
    # 3 queries of 100 -> 112 heads: two wgmmas (224 + 112 columns, wgmma's N <= 256)
    (jnp.bfloat16, 3, 136, 100, 64, [[136, 70, 1], [9, 136, 64]], False, {"block_s": 64, "blocks": 2, "num_stages": 2}),
])
def test_decode_scores_equal_the_triton_kernel(dtype, t, s, h, d, k_len, scaled, tiles):
    """Layer 1 of a 3-layer cache read in place: the Triton decode kernel's -inf mask and scores (IEEE float32)."""
    q, k_cache, w, k_scale = decode_inputs(3, 2, t, s, h, d, dtype, scaled)
    kl = jnp.asarray(k_len, jnp.int32)
    got = np.asarray(mosaic_gpu_decode.indexer_scores_decode_mosaic_gpu(q, k_cache, w, 1, kl, k_scale, interpret=True,
                                                                        **tiles))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(indexer_scores_decode_triton(q, k_cache, w, 1, kl, k_scale, block_s=64, interpret=True))
    n = -(-s // tiles["block_s"]) * tiles["block_s"]
    assert got.shape == (2, t, n) and np.all(np.isneginf(got[..., s:])) and np.all(np.isneginf(want[:, :t, s:]))
    got, want = got[..., :s], want[:, :t, :s]
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)


@needs_interpreter
def test_decode_topk_matches_reference():
    """indexer_topk_decode_triton(mosaic_gpu=True) with a traced layer: the reference's keys."""
    q, k_cache, w, k_scale = decode_inputs(2, 2, 1, 256, 8, 128, jnp.float8_e4m3fn, True)
    kl = jnp.asarray([[200], [3]], jnp.int32)
    run = jax.jit(lambda layer: indexer_topk_decode_triton(q, k_cache, w, layer, kl, topk=8, k_scale=k_scale,
                                                           mosaic_gpu=True, block_s=64, blocks=2, num_stages=2,
                                                           interpret=True))
    got = np.asarray(run(jnp.int32(1)))
    want = np.asarray(indexer_topk_decode_reference(q, k_cache, w, 1, kl, topk=8, k_scale=k_scale))
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
    assert np.all(got[1, 0, 3:] == -1)


@pytest.mark.parametrize("dtype, t", [(jnp.bfloat16, 1), (jnp.float8_e4m3fn, 1), (jnp.bfloat16, 2)])
def test_decode_lowers_for_cuda_at_v32_shapes(dtype, t):
    """B = 64 sequences, a 2-layer cache of 128K keys, 64 heads x 128 (fp8 with its scales): one Mosaic GPU call."""
    sd = jax.ShapeDtypeStruct
    args = (sd((64, t, 64, 128), dtype), sd((2, 64, 131072, 128), dtype), sd((64, t, 64), jnp.float32),
            sd((), jnp.int32), sd((64, t), jnp.int32), sd((2, 64, 131072), jnp.float32))
    scaled = dtype == jnp.float8_e4m3fn
    fn = lambda q, kc, w, layer, kl, ks: indexer_topk_decode_triton(q, kc, w, layer, kl, topk=2048, mosaic_gpu=True,
                                                                     k_scale=ks if scaled else None)
    assert export_for_cuda(fn, args).mlir_module().count("custom_call @mosaic_gpu") == 1


@pytest.fixture
def mosaic_modules(monkeypatch):
    """The Mosaic GPU modules (MLIR text) of the kernels lowered in the test (JAX 0.11+: the custom call's emitter)."""
    from jax._src.pallas.mosaic_gpu import pallas_call_registration as registration
    emit = getattr(registration, "_emit_mosaic_gpu_custom_call", None)
    if emit is None:
        pytest.skip("JAX 0.10 emits the Mosaic GPU custom call elsewhere")
    modules = []

    def capture(ctx, args, lowering_result, *rest, **kwargs):
        modules.append(str(lowering_result.module.operation))
        return emit(ctx, args, lowering_result, *rest, **kwargs)

    monkeypatch.setattr(registration, "_emit_mosaic_gpu_custom_call", capture)
    return modules


@pytest.mark.parametrize("dtype, tiles, shape", [
    (jnp.bfloat16, {}, "m64n128k16.f32.bf16.bf16"),  # 2 queries x 64 heads
    (jnp.bfloat16, {"block_t": 4, "block_s": 64}, "m64n256k16.f32.bf16.bf16"),
    (jnp.float8_e4m3fn, {"num_stages": 4}, "m64n128k32.f32.e4m3.e4m3"),
])
def test_one_wgmma_per_key_block_for_all_queries(dtype, tiles, shape, mosaic_modules):
    """A consumer scores its queries with one wgmma per key block (N = block_t x 64 heads), not one per query, which
    read the key tile from shared memory again for each."""
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 512, 64, 128), dtype), sd((1, 4096, 128), dtype), sd((1, 512, 64), jnp.float32),
            sd((1, 4096), jnp.float32), sd((1,), jnp.int32), sd((512,), jnp.int32))
    export_for_cuda(lambda *a: mosaic_gpu.indexer_scores_mosaic_gpu(*a, **tiles), args)
    [module] = mosaic_modules
    # Every wgmma instruction (M = 64 rows of the key tile, one K step each) has the consumer's whole N.
    assert set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\S*?) ", module)) == {shape}


def test_decode_rejects_what_it_cannot_read_in_place():
    q, k_cache, w, k_scale = decode_inputs(1, 1, 1, 66, 4, 32, jnp.bfloat16, True)
    run = lambda q, kc, ks=None: mosaic_gpu_decode.indexer_scores_decode_mosaic_gpu(q, kc, w, 0, jnp.full((1, 1), 66),
                                                                                    ks)
    with pytest.raises(ValueError, match="whole 128-byte rows"):
        run(q, k_cache)  # D = 32 bf16: 64 bytes
    q, k_cache, w, k_scale = decode_inputs(1, 1, 1, 66, 4, 64, jnp.bfloat16, True)
    with pytest.raises(ValueError, match="a multiple of 8"):
        run(q, k_cache, k_scale)
    with pytest.raises(ValueError, match="bf16, f16 or float8_e4m3fn"):
        run(q.astype(jnp.float32), k_cache.astype(jnp.float32))


def _swept_configs():
    """(part, dtype, config) of every ":mgpu" default of experiments/bench_kernels.py (what gpu_check.sh sweep runs)."""
    from experiments import bench_kernels as bench
    flags = [("indexer", jnp.bfloat16, bench._INDEX_CONFIGS), ("indexer", jnp.float8_e4m3fn, bench._INDEX_FP8_CONFIGS),
             ("decode", jnp.bfloat16, bench._DECODE_CONFIGS), ("decode", jnp.float8_e4m3fn, bench._DECODE_CONFIGS)]
    return [(part, dtype, cfg) for part, dtype, flag in flags for cfg in flag.default if cfg.endswith(":mgpu")]


@pytest.mark.parametrize("part, dtype, cfg", _swept_configs())
def test_every_swept_config_lowers_within_shared_memory(part, dtype, cfg):
    """Each Mosaic GPU tile the benchmark sweeps lowers for an H200 at V3.2 shapes, shared memory included (the
    lowering refuses a kernel over the device's 227 KiB), so the device time is not spent on one that cannot."""
    from experiments import bench_kernels as bench
    sd = jax.ShapeDtypeStruct
    if part == "indexer":
        tiles = bench.index_tiles(cfg)
        args = (sd((1, 1024, 64, 128), dtype), sd((1, 1024, 128), dtype), sd((1, 1024, 64), jnp.float32))
        fn = lambda q, k, w: indexer_topk_triton(q, k, w, topk=2048, **tiles)
    else:
        tiles = bench.decode_tiles(cfg)
        args = (sd((64, 1, 64, 128), dtype), sd((2, 64, 131072, 128), dtype), sd((64, 1, 64), jnp.float32),
                sd((), jnp.int32), sd((64, 1), jnp.int32), sd((2, 64, 131072), jnp.float32))
        fn = lambda q, kc, w, layer, kl, ks: indexer_topk_decode_triton(q, kc, w, layer, kl, topk=2048, k_scale=ks,
                                                                         **tiles)
    assert "custom_call @mosaic_gpu" in export_for_cuda(fn, args).mlir_module()
