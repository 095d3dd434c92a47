"""select_topk (radix select, no sort) selects exactly lax.top_k's set, listed by ascending index.

The oracle is `jax.lax.top_k` on the same scores: its indices with a score > -inf, sorted, then
-1 padding to k. Cases: ties (integers cast to float, bf16-rounded values, exact zeros), -inf
masks with rows holding fewer than k finite scores, negative rows, -0.0 against +0.0 (lax.top_k
orders floats totally: +0.0 ranks above -0.0), S < k, k = S, odd sizes, leading dims, vmap;
both the sampled path (long rows) and its exact fallback (heavy ties), checked to be taken.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import topk


@functools.partial(jax.jit, static_argnums=1)
def select(scores, k):
    return topk.select_topk(scores, k)


def expected(scores, k):
    """lax.top_k's selected indices (score > -inf), ascending, padded with -1 to k."""
    scores = jnp.asarray(scores)
    vals, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    idx = np.sort(np.where(np.isneginf(np.asarray(vals)), np.iinfo(np.int32).max, np.asarray(idx)), axis=-1)
    idx = np.where(idx == np.iinfo(np.int32).max, -1, idx)
    return np.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, k - idx.shape[-1])], constant_values=-1)


def check(scores, k):
    scores = jnp.asarray(scores, jnp.float32)
    got = np.asarray(select(scores, k))
    assert got.dtype == np.int32 and got.shape == scores.shape[:-1] + (k,)
    np.testing.assert_array_equal(got, expected(scores, k))


def sampled_path_ok(scores, k):
    """Per row, whether the sampled candidates of these long rows hold the exact answer."""
    assert topk.sample_plan(scores.shape[-1], k) is not None, "rows too short for the sampled path"
    return np.asarray(jax.jit(topk.sampled_rows_ok, static_argnums=1)(jnp.asarray(scores, jnp.float32), k))


RNG = np.random.default_rng(0)
SHORT = (6, 50)   # whole row is the buffer: the exact select
LONG = (6, 3000)  # sampled path (buffer 864 for k = 64)


def masked(x, lengths):
    """x with scores at and past each row's length set to -inf (as the causal/k_len mask does)."""
    x = np.array(x, np.float32)
    x[np.arange(x.shape[-1])[None, :] >= np.asarray(lengths)[:, None]] = -np.inf
    return x


@pytest.mark.parametrize("shape, k", [(SHORT, 7), (LONG, 64)])
@pytest.mark.parametrize("case", ["normal", "integer_ties", "bf16", "negative", "masked", "zeros_signed"])
def test_matches_lax_top_k(shape, k, case):
    s = shape[-1]
    x = RNG.normal(size=shape).astype(np.float32)
    if case == "integer_ties":
        x = RNG.integers(-3, 4, size=shape).astype(np.float32)
    elif case == "bf16":
        x = np.asarray(jnp.asarray(x * 3, jnp.bfloat16).astype(jnp.float32))
    elif case == "negative":
        x = x - 100.0
    elif case == "masked":  # fewer than k finite, exactly k, all -inf, all finite
        x = masked(x, [k // 2, k, 0, s, k + 1, 3 * s // 4])
    elif case == "zeros_signed":  # mostly +0.0 / -0.0, some positives and -infs
        x = np.where(RNG.random(shape) < 0.5, 0.0, -0.0).astype(np.float32)
        x[RNG.random(shape) < 0.05] = 1.0
        x = masked(x, [s, s, k // 2, s, s, s // 2])
    check(x, k)


def test_negative_zero_ranks_below_positive_zero():
    x = np.array([[-0.0, 0.0, -0.0, 0.0, -1.0, -0.0]], np.float32)
    np.testing.assert_array_equal(select(jnp.asarray(x), 3), [[0, 1, 3]])  # both +0.0, then the first -0.0
    check(x, 3)


@pytest.mark.parametrize("shape, k", [((2, 5), 8), ((3, 37), 37), ((4, 33), 1), ((1, 1), 1), ((2, 3, 65), 10)])
def test_sizes(shape, k):
    """S < k (-1 padding), k = S, k = 1, a single key, leading dims; rows with ties."""
    x = RNG.integers(-2, 3, size=shape).astype(np.float32)
    check(x, k)
    check(RNG.normal(size=shape), k)


def test_sampled_path_taken_and_fallback_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=LONG).astype(np.float32)
    assert sampled_path_ok(x, 64).all()
    ties = rng.integers(-3, 4, size=LONG).astype(np.float32)  # ~430 keys tie at the threshold: fit the buffer
    assert sampled_path_ok(ties, 64).all()
    check(ties, 64)
    ties = rng.integers(0, 2, size=LONG).astype(np.float32)  # ~1500 tie: more than the buffer (864)
    assert not sampled_path_ok(ties, 64).any()
    check(np.concatenate([x[:3], ties[:3]]), 64)  # one bad row sends the whole call to the exact path
    few = masked(x, [10, 40, 63, 64, 65, 500])  # rows with few finite keys take them all
    assert sampled_path_ok(few, 64).all()
    check(few, 64)


def test_vmap_matches_batched_call():
    """Under vmap the sampled path's lax.cond becomes a select of both branches: still exact."""
    x = RNG.normal(size=(2, 2, 1800)).astype(np.float32)  # long enough to sample (buffer 864)
    x[1, 0] = RNG.integers(0, 2, size=1800)                # ties beyond the buffer: the fallback's answer
    got = jax.jit(jax.vmap(lambda a: topk.select_topk(a, 64)))(jnp.asarray(x))
    np.testing.assert_array_equal(got, expected(x, 64))


def test_compact_lists_set_bits_in_order():
    mask = RNG.random((5, 200)) < np.array([0.0, 0.02, 0.3, 0.9, 1.0])[:, None]
    got = np.asarray(jax.jit(lambda m: topk._compact(topk._pack(m), 64))(jnp.asarray(mask)))
    for row, m in zip(got, mask):
        want = np.flatnonzero(m)[:64]
        np.testing.assert_array_equal(row, np.pad(want, (0, 64 - len(want)), constant_values=-1))


def test_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        topk.select_topk(jnp.zeros((2, 4)), 0)
