"""`ops.indexer_topk_decode`: the decode kernels (Triton interpreted, Mosaic under
`pltpu.InterpretParams`) equal the reference, and the reference equals brute force.

Inputs: one layer (> 0, static or traced) of a stacked cache of L = 3 layers, S = 300 keys (not a
multiple of either kernel's key block: 64 for Triton, 128 for Mosaic, in several blocks whose
last one is partial; blocks past a sequence's keys are skipped; the Triton kernel also with 3
key blocks of 32 per program, in its loop), T = 1 or 3 queries with
ragged key limits per (sequence, query), including k_len = 0 and k_len < topk (-1 slots).
Kernels must select the reference's set (or equal scores where summation order flips a
near-tie) and list it in ascending index order. A cached model step with attention_impl="pallas"
runs the kernel inside the model's layer scan (the reason for its zero-backward custom_vjp).
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
from pallas_kernels.indexer.mosaic_decode import indexer_topk_decode_mosaic
from pallas_kernels.indexer.reference import indexer_topk_decode_reference
from pallas_kernels.indexer.triton_decode import (
    indexer_scores_decode_triton,
    indexer_topk_decode_triton,
)
from tests.pallas_kernels.test_indexer import ascending_then_padding, same_selection
from tests.test_generate import random_params

L, B, S, H, D, TOPK = 3, 2, 300, 5, 32, 8
# Several key blocks, the last one partial (the ops entry point uses the default tiles: 128 and 384 here).
KERNELS = {"triton": (indexer_topk_decode_triton, 64),
           "triton_key_loop": (functools.partial(indexer_topk_decode_triton, blocks=3), 32),
           "mosaic": (indexer_topk_decode_mosaic, 128),
           "mosaic_radix": (functools.partial(indexer_topk_decode_mosaic, selection="radix"), 128)}
K_LEN = {1: [[300], [5]],                      # full cache; fewer keys than topk
         3: [[300, 3, 0], [17, 133, 140]]}     # a query with no key; queries of one sequence differ


def decode_inputs(t, dtype, seed=0):
    """q [B,T,H,D], k_cache [L,B,S,D] in dtype (e4m3 for FP8), w [B,T,H] and k_scale [L,B,S] float32."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, H, D)), dtype)
    k_cache = jnp.asarray(rng.normal(size=(L, B, S, D)), dtype)
    w = jnp.asarray(rng.normal(size=(B, t, H)), jnp.float32)
    k_scale = jnp.asarray(rng.uniform(0.5, 2, size=(L, B, S)), jnp.float32)
    return q, k_cache, w, k_scale, jnp.asarray(K_LEN[t], jnp.int32)


def check(got, q, k_cache, w, layer, k_len, k_scale):
    """got equals the reference's selection (as sets; near-ties by score) on one layer, indices ascending."""
    got = np.asarray(got)
    want = np.asarray(indexer_topk_decode_reference(q, k_cache, w, layer, k_len, topk=TOPK, k_scale=k_scale))
    assert got.dtype == np.int32 and got.shape == want.shape == (B, q.shape[1], TOPK)
    assert same_selection(got, want, q, k_cache[layer], w, None if k_scale is None else k_scale[layer])
    assert ascending_then_padding(got)
    # -1 exactly in the slots past each query's keys.
    np.testing.assert_array_equal((got >= 0).sum(-1), np.minimum(np.asarray(k_len), TOPK))


def test_reference_matches_brute_force():
    """Per (b, t): the TOPK largest float64 scores over s < k_len[b, t], ties to the lowest index."""
    q, k_cache, w, k_scale, k_len = decode_inputs(3, jnp.float32)
    got = np.asarray(ops.indexer_topk_decode(q, k_cache, w, 2, k_len, topk=TOPK, k_scale=k_scale, impl="reference"))
    scores = np.einsum("BTH,BTHS->BTS", np.asarray(w, np.float64),
                       np.maximum(np.einsum("BTHD,BSD->BTHS", np.asarray(q, np.float64),
                                            np.asarray(k_cache[2], np.float64)), 0))
    scores *= np.asarray(k_scale[2], np.float64)[:, None, :]
    for b in range(B):
        for t in range(3):
            n = int(k_len[b, t])
            ranked = sorted(range(n), key=lambda s: (-scores[b, t, s], s))[:TOPK]
            assert got[b, t].tolist() == ranked + [-1] * (TOPK - len(ranked))


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("t, dtype, scaled, layer", [
    (1, jnp.float32, True, "scan"),  # traced: a scan over the layers under jit, as in the model
    (3, jnp.bfloat16, False, 1),
    (3, jnp.float8_e4m3fn, True, 2),  # the model's index_fp8 cache: e4m3 keys with per-key scales
])
def test_kernels_match_reference(impl, t, dtype, scaled, layer):
    q, k_cache, w, k_scale, k_len = decode_inputs(t, dtype)
    k_scale = k_scale if scaled else None
    topk_fn, block_s = KERNELS[impl]
    run = jax.jit(lambda layer, q, k_cache, w, k_len, k_scale: topk_fn(
        q, k_cache, w, layer, k_len, topk=TOPK, k_scale=k_scale, block_s=block_s, interpret=True))
    if layer == "scan":
        got = jax.jit(lambda *a: jax.lax.scan(lambda _, i: (None, run(i, *a)), None, jnp.arange(L))[1])(
            q, k_cache, w, k_len, k_scale)
        for i in range(L):
            check(got[i], q, k_cache, w, i, k_len, k_scale)
        assert not np.array_equal(np.sort(got[0], -1), np.sort(got[2], -1))  # each layer's own keys
    else:
        check(run(layer, q, k_cache, w, k_len, k_scale), q, k_cache, w, layer, k_len, k_scale)


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic"])
def test_exact_zero_ties_keep_the_lowest_index(impl):
    q, k_cache, _, _, k_len = decode_inputs(3, jnp.float32, seed=2)
    got = np.asarray(ops.indexer_topk_decode(q, k_cache, jnp.zeros((B, 3, H)), 2, k_len, topk=TOPK, impl=impl,
                                             interpret=True))
    for b in range(B):
        for t in range(3):
            n = min(int(k_len[b, t]), TOPK)
            assert got[b, t].tolist() == list(range(n)) + [-1] * (TOPK - n)


@pytest.mark.parametrize("args, match", [
    ({"k_cache": jnp.zeros((B, S, D))}, "expected q"),           # one layer, not the stacked cache
    ({"k_cache": jnp.zeros((L, B, S, D + 1))}, "shapes disagree"),
    ({"w": jnp.zeros((B, 1, H + 1))}, "shapes disagree"),
    ({"k_len": jnp.zeros((B,), jnp.int32)}, "k_len"),            # one limit per query, not per sequence
    ({"k_scale": jnp.zeros((B, S))}, "k_scale"),
    ({"layer": 3}, "layer"),
    ({"layer": jnp.zeros((1,), jnp.int32)}, "layer"),
    ({"topk": 0}, "topk"),
])
def test_bad_input_raises(args, match):
    inputs = {"q": jnp.zeros((B, 1, H, D)), "k_cache": jnp.zeros((L, B, S, D)), "w": jnp.zeros((B, 1, H)),
              "layer": 0, "k_len": jnp.zeros((B, 1), jnp.int32), "k_scale": None, "topk": TOPK} | args
    with pytest.raises(ValueError, match=match):
        ops.indexer_topk_decode(**inputs)


def test_model_cached_step_with_the_kernels():
    """A cached step of T = 2 tokens (speculative verification's shape) through the model's layer scan,
    attention_impl="pallas" (the kernels, interpreted, with a traced layer: this decode indexer and
    `ops.sparse_mla_decode`) vs "reference": the same selections (as sets) and logits."""
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8, attention_impl="reference")
    params = random_params(cfg)
    rng = np.random.default_rng(5)
    lengths = jnp.asarray([13, 10], jnp.int32)  # past index_topk keys: a real selection
    cache = prefill(params, cfg, jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 16)), jnp.int32), lengths,
                    init_cache(cfg, 2, 32))[1]
    new = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 2)), jnp.int32)

    @functools.partial(jax.jit, static_argnames="c")
    def step(cache, c):
        logits, aux = Transformer(c).apply({"params": params}, new, with_mtp=False, cache=cache, return_indices=True)
        return logits, aux["indices"]

    (want, want_idx), (got, got_idx) = step(cache, cfg), step(cache, cfg.replace(attention_impl="pallas"))
    for name in want_idx:
        np.testing.assert_array_equal(np.sort(got_idx[name], -1), np.sort(want_idx[name], -1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_mosaic_kernel_lowers_for_tpu_in_place(dtype):
    """Pallas's TPU lowering accepts the default tiles at V3.2 decode shapes (B = 64, S = 128K, 64 x 128
    heads, L = 3), and no [.., S, D] slice of the keys is taken (the DMA reads the layer)."""
    sd = jax.ShapeDtypeStruct
    b, s, h, d = 64, 131072, 64, 128
    args = [sd((b, 1, h, d), dtype), sd((L, b, s, d), dtype), sd((b, 1, h), jnp.float32), sd((), jnp.int32),
            sd((b, 1), jnp.int32), sd((L, b, s), jnp.float32)]
    fn = lambda q, k, w, layer, k_len, ks: indexer_topk_decode_mosaic(q, k, w, layer, k_len, topk=2048, k_scale=ks)
    module = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    assert module.count("tpu_custom_call") == 1
    assert not any("dynamic_slice" in line and f"{s}x{d}x" in line for line in module.splitlines())


def test_topk_kernel_equals_select_topk():
    """topk_kernel=True (select_topk_triton on the scores) returns select_topk's indices, order and -1 slots
    included (ragged k_len, a query with no key)."""
    q, k_cache, w, k_scale, k_len = decode_inputs(3, jnp.bfloat16)
    run = lambda topk_kernel: np.asarray(indexer_topk_decode_triton(
        q, k_cache, w, 1, k_len, topk=TOPK, k_scale=k_scale, topk_kernel=topk_kernel, block_s=64, interpret=True))
    np.testing.assert_array_equal(run(True), run(False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float8_e4m3fn])
def test_key_loop_scores_equal_one_block_per_program(dtype):
    """blocks > 1 (key blocks per program, in a loop) computes each block as blocks = 1 does: the same scores
    bitwise, -inf past each query's k_len and past S, over a cache of no whole programs (S = 300, 96 keys each)."""
    q, k_cache, w, k_scale, k_len = decode_inputs(3, dtype)
    scores = lambda blocks: np.asarray(indexer_scores_decode_triton(q, k_cache, w, 2, k_len, k_scale, block_s=32,
                                                                    blocks=blocks, interpret=True))[:, :3, :S]
    one, loop = scores(1), scores(3)
    np.testing.assert_array_equal(loop, one)
    assert np.isneginf(one[1, 0, 17:]).all() and np.isfinite(one[1, 1, :133]).all()
    with pytest.raises(ValueError, match="blocks .* must be >= 1"):
        indexer_scores_decode_triton(q, k_cache, w, 2, k_len, k_scale, blocks=0, interpret=True)


def test_mosaic_rejects_an_unknown_selection():
    q, k_cache, w, _, k_len = decode_inputs(1, jnp.float32)
    with pytest.raises(ValueError, match="indexer_topk_decode_mosaic: selection must be one of"):
        indexer_topk_decode_mosaic(q, k_cache, w, 0, k_len, topk=TOPK, selection="approx", interpret=True)
