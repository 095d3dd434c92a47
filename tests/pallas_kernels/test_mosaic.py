"""The TPU (Mosaic) kernels, run on CPU under `pltpu.InterpretParams`, equal the pure-JAX references.

Under the TPU interpreter the DMAs, semaphores and SMEM/VMEM buffers are simulated, so the
gather/scatter bookkeeping is exercised, not only the math. Tiny shapes and small tiles
(block_k = 8 rows, 8-key blocks) make several blocks per query; the TPU's (8, 128) tile rules
are checked separately by lowering the default-tile kernels for TPU (`jax.export`, no TPU needed).

Tolerances as in test_sparse_mla.py: float32 1e-5 (gradients 2e-5); bfloat16 inputs 2e-2
(gradients 5e-2 of the largest entry) against the float32 reference of the same bf16 values.
Indexer: the same indices, or equal scores where summation order flips a near-tie.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.indexer.mosaic import indexer_topk_mosaic
from pallas_kernels.indexer.reference import indexer_topk_reference
from pallas_kernels.sparse_mla import mosaic as sparse_mla_mosaic
from pallas_kernels.sparse_mla.reference import sparse_mla_reference
from tests.pallas_kernels.test_indexer import (
    ascending_then_padding,
    random_inputs,
    same_selection,
)
from tests.pallas_kernels.test_sparse_mla import random_case

f32 = lambda x: x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="v_dim")
def reference_and_vjp(q, kv, idx, d_out, *, v_dim):
    """Float32 reference output and (dq, dkv) for cotangent d_out; jitted once per shape for both dtypes."""
    out, vjp = jax.vjp(lambda a, b: sparse_mla_reference(a, b, idx, scale=0.2, v_dim=v_dim), f32(q), f32(kv))
    return out, vjp(f32(d_out))


SMALL_BLOCKS = (2, 3, 20, 5, 32, 16, 23)  # (b, t, s, h, v, r, k): S < K (-1 past S); 3 blocks of 8 rows, the last partial
ONE_BLOCK = (1, 3, 40, 16, 16, 16, 12)     # another head count; the default block_k: one block of all 12 rows


@pytest.mark.parametrize("case, block_k", [(SMALL_BLOCKS, 8), (ONE_BLOCK, 128)])
@pytest.mark.parametrize("dtype, tol, grad_tol", [(jnp.float32, 1e-5, 2e-5), (jnp.bfloat16, 2e-2, 5e-2)])
def test_sparse_mla_kernels_match_reference(case, block_k, dtype, tol, grad_tol):
    q, kv, idx = random_case(0, *case, dtype)  # -1 slots among used ones, query 2 selects nothing
    v = case[4]
    out, lse = sparse_mla_mosaic.sparse_mla_fwd(q, kv, idx, scale=0.2, v_dim=v, block_k=block_k, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(2).normal(size=out.shape), dtype)
    ref, ref_grads = reference_and_vjp(q, kv, idx, d_out, v_dim=v)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=tol, atol=tol)
    assert np.all(np.isneginf(np.asarray(lse)[0, 2])) and np.all(np.asarray(out)[0, 2] == 0)

    dq, dkv = sparse_mla_mosaic.sparse_mla_bwd(q, kv, idx, out, lse, d_out, scale=0.2, v_dim=v, block_k=block_k,
                                               interpret=True)
    assert dq.dtype == dtype and dkv.dtype == dtype
    for got, want in zip((dq, dkv), ref_grads):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=grad_tol * scale, rtol=grad_tol)


@pytest.mark.parametrize("unique_indices", [False, True])
def test_ops_sparse_mla_gradient_on_the_mosaic_path(unique_indices):
    """Either backward input: each query's rows sorted and merged, or (unique_indices, the model's) as they are."""
    # ONE_BLOCK's shapes and the default tiles: the kernels compiled by the test above are reused.
    q, kv, idx = random_case(3, *ONE_BLOCK, jnp.float32)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape[:3] + (ONE_BLOCK[4],)), jnp.float32)
    loss = lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.2, v_dim=ONE_BLOCK[4], impl="mosaic",
                                                  interpret=True, unique_indices=unique_indices) * cot)
    got = jax.grad(loss, argnums=(0, 1))(q, kv)
    _, want = reference_and_vjp(q, kv, idx, cot, v_dim=ONE_BLOCK[4])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b, t, s, h, d, topk, q_offset, k_len, chunk, dtype", [
    (2, 19, 19, 5, 24, 5, 0, None, 8, jnp.float32),   # odd T, chunk not dividing T, 2 key blocks of 2 tiles
    (2, 19, 19, 5, 24, 5, 0, None, 8, jnp.bfloat16),
    (2, 13, 22, 8, 32, 8, 9, [22, 11], 16, jnp.bfloat16),  # decode-style offset, per-sequence lengths
    (1, 9, 9, 3, 16, 32, 0, None, 4, jnp.float32),    # S < topk: -1 padding
])
@pytest.mark.parametrize("selection", ["sort", "radix"])
def test_indexer_topk_matches_reference(b, t, s, h, d, topk, q_offset, k_len, chunk, dtype, selection):
    q, k, w, k_scale, kl = random_inputs(b, t, s, h, d, k_len, dtype)
    got = indexer_topk_mosaic(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=kl, chunk_size=chunk,
                              key_block=16, block_t=8, block_s=8, selection=selection, interpret=True)
    want = indexer_topk_reference(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=kl)
    assert got.dtype == jnp.int32 and got.shape == want.shape
    assert same_selection(np.asarray(got), np.asarray(want), q, k, w, k_scale)
    assert ascending_then_padding(np.asarray(got))


@pytest.mark.parametrize("selection", ["sort", "radix"])
def test_indexer_topk_exact_ties_keep_the_lowest_index(selection):
    """Zero head weights score every visible key 0: each query keeps its lowest indices, across 3 key blocks
    merged one after another and a causal limit (query t sees t + 1 keys)."""
    q, k, _, _, _ = random_inputs(1, 40, 40, 4, 16, None, jnp.float32)
    got = np.asarray(indexer_topk_mosaic(q, k, jnp.zeros((1, 40, 4)), topk=6, chunk_size=16, key_block=16, block_t=8,
                                         block_s=8, selection=selection, interpret=True))
    for t in range(40):
        n = min(t + 1, 6)
        assert got[0, t].tolist() == list(range(n)) + [-1] * (6 - n)


def test_indexer_topk_rejects_an_unknown_selection():
    q, k, w, _, _ = random_inputs(1, 8, 8, 2, 16, None, jnp.float32)
    with pytest.raises(ValueError, match="indexer_topk_mosaic: selection must be one of"):
        indexer_topk_mosaic(q, k, w, topk=4, selection="bitonic", interpret=True)


@pytest.mark.parametrize("backend, impl, interpret, expected", [
    ("tpu", "auto", False, ("mosaic", False)),
    ("tpu", "pallas", False, ("mosaic", False)),
    ("tpu", "triton", False, ("triton", True)),
    ("gpu", "auto", False, ("triton", False)),
    ("gpu", "mosaic", False, ("mosaic", True)),
    ("cpu", "auto", False, (None, False)),
    ("cpu", "pallas", False, ("triton", True)),
    ("cpu", "mosaic", True, ("mosaic", True)),
    ("cpu", "reference", True, (None, False)),
])
def test_dispatch(monkeypatch, backend, impl, interpret, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ops._kernel(impl, interpret) == expected



@pytest.mark.parametrize("backend, impl, expected", [
    ("tpu", "auto", "mosaic"), ("gpu", "auto", "triton"), ("cpu", "auto", "reference"),
    ("cpu", "pallas", "triton (interpreted)"), ("gpu", "reference", "reference"),
])
def test_implementation_names_the_dispatch(monkeypatch, backend, impl, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ops.implementation(impl) == expected

def test_default_tiles_lower_for_tpu():
    """Pallas's TPU lowering (block-shape rules, primitives) accepts the kernels at V3.2-like shapes."""
    sd = jax.ShapeDtypeStruct
    b, t, s, h, hi = 1, 16, 1024, 16, 64
    q, kv, idx = sd((b, t, h, 576), jnp.bfloat16), sd((b, s, 576), jnp.bfloat16), sd((b, t, 300), jnp.int32)
    out, lse = sd((b, t, h, 512), jnp.bfloat16), sd((b, t, h), jnp.float32)
    for fn, args in (
        (lambda *a: sparse_mla_mosaic.sparse_mla_fwd(*a, scale=0.1, v_dim=512), (q, kv, idx)),
        (lambda *a: sparse_mla_mosaic.sparse_mla_bwd(*a, scale=0.1, v_dim=512), (q, kv, idx, out, lse, out)),
        (lambda *a: indexer_topk_mosaic(*a, topk=256, chunk_size=16, key_block=512),
         (sd((b, t, hi, 128), jnp.bfloat16), sd((b, s, 128), jnp.bfloat16), sd((b, t, hi), jnp.float32))),
    ):
        module = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in module
