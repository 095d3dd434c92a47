"""The sparse MLA kernels walk a query's index blocks only up to its last used slot (`blocks.py`).

Indices in the indexer's form (each query's rows ascending, then -1), with row counts 0, 1, one
short of a block, a whole block, one past it and all K: every kernel (Triton and Mosaic; forward,
both Triton backward forms, the Mosaic backward with and without merging repeats; both decode
kernels, the Triton one with walk_all=False, not its default) equals the reference and its VJP.
A query whose only used slot is its last (-1 before it) walks every block. And the kernels do
stop at the count: with `walked_blocks` capped at one block, each kernel attends over the first
block's rows only. Tolerances: float32, 1e-5 (gradients 2e-5), as test_sparse_mla.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_mla import mosaic, mosaic_decode, triton, triton_decode
from pallas_kernels.sparse_mla.blocks import walked_blocks
from pallas_kernels.sparse_mla.reference import (
    sparse_mla_decode_reference,
    sparse_mla_reference,
)

B, T, S, H, V, R, K, BLOCK_K, SCALE = 2, 7, 40, 5, 32, 16, 40, 16, 0.2
COUNTS = (0, 1, BLOCK_K - 1, BLOCK_K, BLOCK_K + 1, K)  # rows held by queries 0..5; query 6: only its last slot


def prefix_indices(seed):
    """[B, T, K] int32: query t's COUNTS[t] rows ascending, then -1; the last query: -1 but its last slot."""
    rng = np.random.default_rng(seed)
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t, n in enumerate(COUNTS):
            idx[b, t, :n] = np.sort(rng.permutation(S)[:n])
        idx[b, T - 1, K - 1] = rng.integers(S)
    return jnp.asarray(idx)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, V + R)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, S, V + R)), jnp.float32)
    return q, kv, prefix_indices(seed)


def test_walked_blocks():
    idx = jnp.asarray([[-1, -1, -1, -1, -1], [3, -1, -1, -1, -1], [3, 4, -1, -1, -1], [3, 4, 5, -1, -1],
                       [-1, -1, -1, -1, 7]])
    rows = jax.vmap(lambda row: walked_blocks(row >= 0, 2))
    np.testing.assert_array_equal(rows(idx), [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(jax.vmap(lambda row: walked_blocks(row[None] >= 0, 2))(idx), [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(jax.vmap(lambda row: walked_blocks(row >= 0, BLOCK_K))(prefix_indices(0)[0]),
                                  [0, 1, 1, 1, 2, 3, 3])


FORWARDS = {
    "triton": functools.partial(triton.sparse_mla_fwd, block_h=16, block_k=BLOCK_K),
    "mosaic": functools.partial(mosaic.sparse_mla_fwd, block_k=8),
}
BACKWARDS = {
    "triton": functools.partial(triton.sparse_mla_bwd, block_h=16, block_k=BLOCK_K),
    "triton-split-dkv": functools.partial(triton.sparse_mla_bwd, block_h=16, block_k=BLOCK_K, split_dkv=True),
    "mosaic": functools.partial(mosaic.sparse_mla_bwd, block_k=8),
    "mosaic-unique": functools.partial(mosaic.sparse_mla_bwd, block_k=8, unique_indices=True),
}


@pytest.mark.parametrize("backward", sorted(BACKWARDS))
def test_prefill_kernels_match_reference(backward):
    q, kv, idx = inputs()
    forward = FORWARDS[backward.split("-")[0]]
    out, lse = forward(q, kv, idx, scale=SCALE, v_dim=V, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
    want, vjp = jax.vjp(lambda a, b: sparse_mla_reference(a, b, idx, scale=SCALE, v_dim=V), q, kv)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[:, 0] == 0)  # no rows
    grads = BACKWARDS[backward](q, kv, idx, out, lse, d_out, scale=SCALE, v_dim=V, interpret=True)
    for got, ref in zip(grads, vjp(d_out)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


# The Triton decode kernel stops at the last used slot only with walk_all=False (its default walks every block).
DECODES = {
    "triton": functools.partial(triton_decode.sparse_mla_decode_triton, block_h=16, block_k=BLOCK_K, walk_all=False),
    "triton-splits": functools.partial(triton_decode.sparse_mla_decode_triton, block_h=16, block_k=BLOCK_K,
                                       num_splits=2, walk_all=False),
    "mosaic": functools.partial(mosaic_decode.sparse_mla_decode_mosaic, block_k=8),
}


@pytest.mark.parametrize("decode", sorted(DECODES))
def test_decode_kernels_match_reference(decode):
    q, kv, idx = inputs(2)
    cache = jnp.stack([kv * 0.5, kv])  # [L = 2, B, S, D]: layer 1 is kv
    got = DECODES[decode](q, cache, 1, idx, scale=SCALE, v_dim=V, interpret=True)
    want = sparse_mla_decode_reference(q, cache, 1, idx, scale=SCALE, v_dim=V)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_traces():
    """The jitted kernels retrace here and after: none of their traces outlives a patched count."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def capped_at_one_block(monkeypatch, module):
    monkeypatch.setattr(module, "walked_blocks", lambda used, block_k: jnp.minimum(walked_blocks(used, block_k), 1))


@pytest.mark.parametrize("backward", sorted(BACKWARDS))
def test_prefill_kernels_stop_at_the_count(backward, monkeypatch, fresh_traces):
    """With the count capped at one block, the forward and backward kernels attend over the first block's slots
    only: the reference (and its VJP) on those slots."""
    name = backward.split("-")[0]
    capped_at_one_block(monkeypatch, {"triton": triton, "mosaic": mosaic}[name])
    q, kv, idx = inputs(3)
    first_block = jnp.where(jnp.arange(K) < (8 if name == "mosaic" else BLOCK_K), idx, -1)
    out, lse = FORWARDS[name](q, kv, idx, scale=SCALE, v_dim=V, interpret=True)
    want, vjp = jax.vjp(lambda a, b: sparse_mla_reference(a, b, first_block, scale=SCALE, v_dim=V), q, kv)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, sparse_mla_reference(q, kv, idx, scale=SCALE, v_dim=V))
    d_out = jnp.asarray(np.random.default_rng(4).normal(size=out.shape), jnp.float32)
    grads = BACKWARDS[backward](q, kv, idx, out, lse, d_out, scale=SCALE, v_dim=V, interpret=True)
    for got, ref in zip(grads, vjp(d_out)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("decode", sorted(DECODES))
def test_decode_kernels_stop_at_the_count(decode, monkeypatch, fresh_traces):
    capped_at_one_block(monkeypatch, triton_decode if decode.startswith("triton") else mosaic)  # mosaic._walk
    q, kv, idx = inputs(3)
    first_block = jnp.where(jnp.arange(K) < (8 if decode == "mosaic" else BLOCK_K), idx, -1)
    got = DECODES[decode](q, kv[None], 0, idx, scale=SCALE, v_dim=V, interpret=True)
    want = sparse_mla_reference(q, kv, first_block, scale=SCALE, v_dim=V)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
