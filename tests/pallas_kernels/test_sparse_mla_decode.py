"""`ops.sparse_mla_decode`: the decode kernels (Triton interpreted, Mosaic under `pltpu.InterpretParams`)
equal the reference, the reference equals a float64 brute force, and both kernels lower at V3.2
decode shapes reading the stacked cache in place.

Inputs: one layer (static, or traced inside lax.scan) of a stacked cache of L = 3 layers, S = 90
rows (even, as the Mosaic kernel's bf16 row pairs need; no multiple of any block), T = 1 or 3
queries of K = 23 selected rows (not a multiple of the row blocks: 16 for Triton, 8 for Mosaic,
or one block of all rows), with -1 slots among the used ones, a query that selects nothing, a
repeated index, the first and last rows and both rows of a bf16 pair. Head counts 5 (not a
multiple of block_h = 16), 16 and 32 (two head blocks); latent/RoPE widths 32/16 (powers of two,
as at V3.2) and 40/12 (masked columns in the Triton kernel); num_splits 1, 2 and 3 (3 leaves a
split with no rows). Tolerances: float32 1e-5; bfloat16 inputs 2e-2 against the float32
reference of the same bf16 values (as test_sparse_mla.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer
from deepseek_jax.cache import init_cache
from deepseek_jax.generate import prefill
from pallas_kernels import ops
from pallas_kernels.sparse_mla.mosaic_decode import sparse_mla_decode_mosaic
from pallas_kernels.sparse_mla.reference import sparse_mla_decode_reference
from pallas_kernels.sparse_mla.triton_decode import sparse_mla_decode_triton
from pallas_kernels.triton_lowering import TRITON_CALL, export_for_cuda
from tests.test_generate import random_params

L, B, S, K, SCALE = 3, 2, 90, 23, 0.2
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def decode_inputs(t, h, v, r, dtype, seed=0):
    """q [B, T, H, V+R], kv_cache [L, B, S, V+R] in dtype, indices [B, T, K] int32 with the cases above."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, h, v + r)), dtype)
    kv = jnp.asarray(rng.normal(size=(L, B, S, v + r)), dtype)
    idx = np.stack([np.stack([rng.permutation(S)[:K] for _ in range(t)]) for _ in range(B)]).astype(np.int32)
    idx[:, :, 4:7] = -1                   # unused slots among the used ones
    idx[1, 0, :4] = [0, S - 1, 40, 41]    # the first and last rows; both rows of a bf16 pair
    idx[1, 0, 9] = idx[1, 0, 8]           # a repeated index (two slots, counted twice)
    idx[0, t - 1] = -1                    # a query that selects nothing -> zeros
    return q, kv, jnp.asarray(idx)


def f32_reference(q, kv, layer, idx, v):
    return sparse_mla_decode_reference(q.astype(jnp.float32), kv.astype(jnp.float32), layer, idx, scale=SCALE,
                                       v_dim=v)


def test_reference_matches_brute_force():
    q, kv, idx = decode_inputs(3, 5, 40, 12, jnp.float32)
    got = np.asarray(ops.sparse_mla_decode(q, kv, 2, idx, scale=SCALE, v_dim=40, impl="reference"))
    q64, kv64, idx = np.asarray(q, np.float64), np.asarray(kv, np.float64)[2], np.asarray(idx)
    want = np.zeros(got.shape)
    for b in range(B):
        for t in range(3):
            rows = kv64[b, idx[b, t][idx[b, t] >= 0]]  # [n, D], one per used slot (repeats included)
            if len(rows):
                s = SCALE * q64[b, t] @ rows.T          # [H, n]
                p = np.exp(s - s.max(-1, keepdims=True))
                want[b, t] = (p / p.sum(-1, keepdims=True)) @ rows[:, :40]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[0, 2] == 0)


# (t, dtype, heads, v, r, layer, tiles per kernel); "scan": a traced layer, each of the L layers in a lax.scan.
CASES = [
    (1, jnp.float32, 5, 32, 16, "scan", {"triton": {"num_splits": 1}, "mosaic": {"block_k": 8}}),
    (3, jnp.bfloat16, 32, 40, 12, 2, {"triton": {"num_splits": 2}, "mosaic": {"block_k": 8}}),
    (3, jnp.float32, 16, 40, 12, 1, {"triton": {"num_splits": 3}, "mosaic": {"block_k": 128}}),
    (1, jnp.bfloat16, 5, 32, 16, "scan", {"triton": {"num_splits": 2}, "mosaic": {"block_k": 128}}),
]
KERNELS = {"triton": functools.partial(sparse_mla_decode_triton, block_h=16, block_k=16),
           "mosaic": sparse_mla_decode_mosaic}


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1].__name__}-H{c[2]}-V{c[3]}-layer{c[5]}")
def test_kernels_match_reference(impl, case):
    t, dtype, h, v, r, layer, tiles = case
    q, kv, idx = decode_inputs(t, h, v, r, dtype)
    run = jax.jit(lambda layer, q, kv, idx: KERNELS[impl](q, kv, layer, idx, scale=SCALE, v_dim=v, interpret=True,
                                                          **tiles[impl]))
    if layer == "scan":
        got = jax.jit(lambda *a: jax.lax.scan(lambda _, i: (None, run(i, *a)), None, jnp.arange(L))[1])(q, kv, idx)
        layers = range(L)
    else:
        got, layers = run(layer, q, kv, idx)[None], [layer]
    for out, i in zip(got, layers):
        want = f32_reference(q, kv, i, idx, v)
        assert out.dtype == dtype and out.shape == want.shape == (B, t, h, v)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), rtol=TOL[dtype], atol=TOL[dtype])
        assert np.all(np.asarray(out)[0, t - 1] == 0)
    if layer == "scan":  # each layer's own rows
        assert not np.allclose(np.asarray(got[0], np.float32), np.asarray(got[2], np.float32))


def test_ops_dispatch_and_no_gradient_through_the_kernels():
    """impl="triton"/"mosaic" run the kernels (equal to the reference); differentiating them raises a clear
    error (a bare pallas_call fails with an empty AssertionError / NotImplementedError); the reference
    is differentiable."""
    q, kv, idx = decode_inputs(1, 5, 32, 16, jnp.float32)
    want = f32_reference(q, kv, 1, idx, 32)
    for impl in ("triton", "mosaic"):
        fn = lambda q_, impl=impl: ops.sparse_mla_decode(q_, kv, 1, idx, scale=SCALE, v_dim=32, impl=impl,
                                                         interpret=True)
        np.testing.assert_allclose(fn(q), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="inference only"):
            jax.grad(lambda q_, fn=fn: jnp.sum(fn(q_)))(q)
    grad = jax.grad(lambda q_: jnp.sum(ops.sparse_mla_decode(q_, kv, 1, idx, scale=SCALE, v_dim=32,
                                                             impl="reference")))(q)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert ops.implementation("auto") == "reference"  # the CPU path of cached_mla_attention


@pytest.mark.parametrize("args, match", [
    ({"kv_cache": jnp.zeros((B, S, 48))}, "expected q"),          # one layer, not the stacked cache
    ({"kv_cache": jnp.zeros((L, B, S, 49))}, "shapes disagree"),
    ({"indices": jnp.zeros((B, 2, K), jnp.int32)}, "shapes disagree"),
    ({"indices": jnp.zeros((B, 1, K), jnp.float32)}, "indices"),
    ({"kv_cache": jnp.zeros((L, B, S, 48), jnp.float16)}, "dtype"),
    ({"v_dim": 49}, "v_dim"),
    ({"layer": 3}, "layer"),
    ({"layer": jnp.zeros((1,), jnp.int32)}, "layer"),
])
def test_bad_input_raises(args, match):
    inputs = {"q": jnp.zeros((B, 1, 4, 48)), "kv_cache": jnp.zeros((L, B, S, 48)), "layer": 0,
              "indices": jnp.zeros((B, 1, K), jnp.int32), "v_dim": 32} | args
    with pytest.raises(ValueError, match=match):
        ops.sparse_mla_decode(scale=SCALE, **inputs)


def test_mosaic_bf16_cache_needs_even_rows():
    q, kv, idx = decode_inputs(1, 5, 32, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="S must be even"):
        sparse_mla_decode_mosaic(q, kv[:, :, :S - 1], 0, idx, scale=SCALE, v_dim=32, interpret=True)


def test_model_cached_bf16_step_with_the_kernels():
    """A cached step of T = 2 tokens (speculative verification's shape) through the model's layer scan on a
    bf16 cache, attention_impl="pallas" (the decode indexer and sparse_mla_decode kernels, interpreted, with a
    traced layer) vs "reference": the same selections (as sets) and logits (bf16 tolerance, below).

    The sequences hold at most index_topk keys, so every visible key is selected (with -1 padding): in
    bf16 the indexer kernel and reference break near-ties differently, which a real selection would turn
    into different logits. The float32 step with a real selection, which runs the same two kernels, is
    test_indexer_decode.py::test_model_cached_step_with_the_kernels."""
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8, attention_impl="reference",
                             dtype="bfloat16")
    params = random_params(cfg)
    rng = np.random.default_rng(5)
    lengths = jnp.asarray([6, 3], jnp.int32)  # + 2 new tokens: at most index_topk = 8 keys
    cache = prefill(params, cfg, jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 16)), jnp.int32), lengths,
                    init_cache(cfg, 2, 32))[1]
    new = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 2)), jnp.int32)

    def step(cache, c):
        logits, aux = Transformer(c).apply({"params": params}, new, with_mtp=False, cache=cache, return_indices=True)
        return logits, aux["indices"]

    kernel_cfg = cfg.replace(attention_impl="pallas")
    assert "sparse_mla_decode" in str(jax.make_jaxpr(step, static_argnums=1)(cache, kernel_cfg))
    step = jax.jit(step, static_argnums=1)
    (want, want_idx), (got, got_idx) = step(cache, cfg), step(cache, kernel_cfg)
    for name in want_idx:
        np.testing.assert_array_equal(np.sort(got_idx[name], -1), np.sort(want_idx[name], -1))
    # Relative L2 error per position: bf16 rounding through the tiny model's 3 layers moves the reference's
    # own logits by 1-2 % from the float32 model's (measured), and the kernel's by as much.
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.max(np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)) < 3e-2


SD = jax.ShapeDtypeStruct
DB, DS, DH, DK = 64, 131072, 128, 2048  # V3.2 decode: sequences, cached rows, heads, selected rows


def decode_args(t):
    """(q, kv_cache, layer, indices) shapes at V3.2 decode shapes, bf16, a stacked cache of 2 layers."""
    return SD((DB, t, DH, 576), jnp.bfloat16), SD((2, DB, DS, 576), jnp.bfloat16), SD((), jnp.int32), \
        SD((DB, t, DK), jnp.int32)


def reads_in_place(module):
    """No slice, dynamic-slice or gather op in the module: the kernel reads the rows of the cache itself."""
    return not any(f"stablehlo.{op}" in module for op in ("slice", "dynamic_slice", "gather"))


@pytest.mark.parametrize("t, num_splits", [(1, 1), (2, 1), (1, 2)])
def test_triton_kernel_lowers_for_cuda_in_place(t, num_splits):
    fn = lambda q, kv, layer, idx: sparse_mla_decode_triton(q, kv, layer, idx, scale=576**-0.5, num_splits=num_splits)
    module = export_for_cuda(fn, decode_args(t)).mlir_module()
    assert module.count(TRITON_CALL) == 1 and reads_in_place(module)


@pytest.mark.parametrize("t", [1, 2])
def test_mosaic_kernel_lowers_for_tpu_in_place(t):
    fn = lambda q, kv, layer, idx: sparse_mla_decode_mosaic(q, kv, layer, idx, scale=576**-0.5)
    module = jax.export.export(jax.jit(fn), platforms=["tpu"])(*decode_args(t)).mlir_module()
    assert module.count("tpu_custom_call") == 1 and reads_in_place(module)
