"""The sparse MLA Pallas kernels (interpret mode on CPU) equal the pure-JAX reference and its VJP.

Tolerances: float32 1e-5; bfloat16 inputs 2e-2 (outputs and gradients rounded to bf16) against
the float32 reference of the same bf16 values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.sparse_mla.reference import sparse_mla_reference
from pallas_kernels.sparse_mla.triton import sparse_mla_bwd, sparse_mla_fwd


def random_case(seed, b, t, s, h, v, r, k, dtype, unused=3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, v + r)), dtype)
    kv = jnp.asarray(rng.normal(size=(b, s, v + r)), dtype)
    kk = min(k, s)
    idx = np.full((b, t, k), -1, np.int32)
    for bi in range(b):
        for ti in range(t):
            idx[bi, ti, :kk] = rng.permutation(s)[:kk]
    idx[:, :, max(kk - unused, 1):kk] = -1  # unused slots among the used ones
    idx[0, min(2, t - 1)] = -1             # a query that selected nothing -> zeros
    return q, kv, jnp.asarray(idx)


CASES = [
    # (b, t, s, h, v, r, k): T off any block size, S < topk, several head counts
    (2, 7, 50, 5, 40, 12, 23),
    (1, 9, 12, 16, 32, 16, 32),
    (2, 3, 70, 1, 64, 8, 40),
    (1, 5, 40, 40, 16, 16, 17),
]


def run_forward(seed, case, dtype):
    """(q, kv, idx, v_dim, out, lse) of the forward kernel on a random case, scale 0.2."""
    q, kv, idx = random_case(seed, *case, dtype)
    v = case[4]
    out, lse = sparse_mla_fwd(q, kv, idx, scale=0.2, v_dim=v, block_h=16, block_k=16, interpret=True)
    return q, kv, idx, v, out, lse


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_forward_matches_reference(case, dtype, tol):
    q, kv, idx, v, out, lse = run_forward(0, case, dtype)
    ref = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.2, v_dim=v)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=tol, atol=tol)
    assert np.all(np.isneginf(np.asarray(lse)[0, min(2, case[1] - 1)]))  # nothing selected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize("split_dkv", [False, True])
def test_backward_matches_reference_vjp(case, dtype, tol, split_dkv):
    """Both backward forms: one kernel (dkv added per head block), or dq and dkv (summed over heads) apart."""
    q, kv, idx, v, out, lse = run_forward(1, case, dtype)
    d_out = jnp.asarray(np.random.default_rng(2).normal(size=out.shape), dtype)
    dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, d_out, scale=0.2, v_dim=v, block_h=16, block_k=16,
                             split_dkv=split_dkv, interpret=True)
    f32 = lambda x: x.astype(jnp.float32)
    _, vjp = jax.vjp(lambda a, b: sparse_mla_reference(a, b, idx, scale=0.2, v_dim=v), f32(q), f32(kv))
    ref_dq, ref_dkv = vjp(f32(d_out))
    assert dq.dtype == dtype and dkv.dtype == dtype
    for got, want in ((dq, ref_dq), (dkv, ref_dkv)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol * scale, rtol=tol)


def test_launch_orders_agree():
    """Head-major and query-major grids (only the launch order differs) give the same forward and gradients."""
    q, kv, idx = random_case(4, 2, 5, 40, 40, 16, 16, 17, jnp.float32)  # 3 head blocks of 16
    run = lambda head_major: sparse_mla_fwd(q, kv, idx, scale=0.2, v_dim=16, block_h=16, block_k=16,
                                            head_major=head_major, interpret=True)
    (out, lse), (out_q, lse_q) = run(True), run(False)
    np.testing.assert_array_equal(out, out_q)
    np.testing.assert_array_equal(lse, lse_q)
    d_out = jnp.asarray(np.random.default_rng(5).normal(size=out.shape), jnp.float32)
    for split_dkv in (False, True):
        grads = [sparse_mla_bwd(q, kv, idx, out, lse, d_out, scale=0.2, v_dim=16, block_h=16, block_k=16,
                                split_dkv=split_dkv, head_major=head_major, interpret=True) for head_major in (True, False)]
        for got, want in zip(*grads):  # dkv: float32 atomic adds in another order
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("v_split, head_major", [(2, True), (4, False)])
def test_value_split_equals_one_program(v_split, head_major):
    """v_split programs per head block, each accumulating its share of the value columns, give the forward of one
    (3 head blocks, value dim 40 padded to 64: parts of 32 and 16 columns, the last part partly padding)."""
    q, kv, idx = random_case(6, 2, 5, 60, 40, 40, 12, 23, jnp.float32)
    run = lambda v_split: sparse_mla_fwd(q, kv, idx, scale=0.2, v_dim=40, block_h=16, block_k=16, v_split=v_split,
                                         head_major=head_major, interpret=True)
    (out, lse), (want, want_lse) = run(v_split), run(1)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(lse, want_lse)


def test_value_split_must_divide_the_value_dim():
    q, kv, idx = random_case(6, 1, 2, 20, 4, 32, 16, 8, jnp.float32)
    with pytest.raises(ValueError, match="v_split must divide"):
        sparse_mla_fwd(q, kv, idx, scale=0.2, v_dim=32, block_h=16, block_k=16, v_split=3, interpret=True)


def test_log_sum_exp():
    q, kv, idx = random_case(1, 1, 4, 30, 3, 32, 16, 8, jnp.float32, unused=0)
    _, lse = sparse_mla_fwd(q, kv, idx, scale=0.5, v_dim=32, block_h=16, block_k=16, interpret=True)
    rows = np.asarray(kv)[0][np.maximum(np.asarray(idx)[0], 0)]  # [T, K, D]
    logits = 0.5 * np.einsum("thd,tkd->thk", np.asarray(q)[0], rows)
    logits = np.where((np.asarray(idx)[0] >= 0)[:, None, :], logits, -np.inf)
    total = np.exp(logits).sum(-1)
    finite = total > 0  # a query with nothing selected has lse = -inf (checked elsewhere)
    expected = np.log(np.where(finite, total, 1.0))
    np.testing.assert_allclose(np.asarray(lse)[0][finite], expected[finite], rtol=1e-5)


def test_ops_gradient_matches_reference_gradient():
    q, kv, idx = random_case(2, 2, 6, 20, 4, 32, 16, 12, jnp.float32)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 4, 32)), jnp.float32)

    def loss(impl):
        return lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.3, v_dim=32, impl=impl,
                                                      interpret=True) * cot)

    got = jax.grad(loss("pallas"), argnums=(0, 1))(q, kv)
    want = jax.grad(loss("reference"), argnums=(0, 1))(q, kv)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
def test_repeated_indices_count_every_occurrence(impl):
    """A row a query selects m times carries m shares of its softmax, as in the reference, and so do its gradients
    (Triton: each slot's atomic add lands, interpreted too; Mosaic: the backward takes each query's distinct rows
    weighted by their counts). 200 slots over 30 rows: rows repeat within a block and across blocks (Mosaic: 2 of
    128, Triton: 7 of 32), with unused slots among them."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(2, 2, 4, 48)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 30, 48)), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, 30, size=(2, 2, 200)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(2, 2, 4, 32)), jnp.float32)

    def loss(impl):
        return lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.3, v_dim=32, impl=impl,
                                                      interpret=True) * cot)

    (got, got_grads), (want, want_grads) = (jax.value_and_grad(loss(i), argnums=(0, 1))(q, kv)
                                            for i in (impl, "reference"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic"])
def test_indices_outside_the_rows_are_unused(impl):
    """Every implementation reads an index outside [0, S) as -1 (FlashMLA's convention), in the forward, the
    gradients and decode; before, the reference clamped it to row S - 1 and the kernels read out of bounds."""
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(2, 3, 4, 48)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 20, 48)), jnp.float32)
    idx = rng.integers(0, 20, size=(2, 3, 24))
    idx[..., ::3] = rng.choice([-5, 20, 21, 1 << 30], size=idx[..., ::3].shape)
    idx[1, 2] = 20  # a query with no row in range
    masked = jnp.asarray(np.where((idx >= 0) & (idx < 20), idx, -1), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(2, 3, 4, 32)), jnp.float32)

    def value_and_grads(idx):
        loss = lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.3, v_dim=32, impl=impl,
                                                      interpret=True) * cot)
        return jax.value_and_grad(loss, argnums=(0, 1))(q, kv)

    for got, want in zip(jax.tree.leaves(value_and_grads(jnp.asarray(idx, jnp.int32))),
                         jax.tree.leaves(value_and_grads(masked))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    decode = lambda idx: ops.sparse_mla_decode(q, kv[None], 0, idx, scale=0.3, v_dim=32, impl=impl, interpret=True)
    np.testing.assert_allclose(decode(jnp.asarray(idx, jnp.int32)), decode(masked), rtol=1e-6, atol=1e-6)
