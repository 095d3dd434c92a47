"""select_topk_triton (the radix-select top-k as one Triton-lowered Pallas kernel) under interpretation.

Oracle: `jax.lax.top_k`'s selected indices (score > -inf), ascending, -1 padded (`test_topk.expected`),
which is also exactly what `select_topk` returns, order included. Each case mixes rows that take
the sampled buffer with rows that fall back to the exact select over the whole row (heavy ties, a
row of few finite scores), and checks that both kinds are present (`topk.sampled_rows_ok`).
Cases: long rows with default blocks (one sample block, one buffer block), every source in many
small blocks (block = max_block = 64: the counting and emission loops), short rows (no sample),
S < k, odd S with leading dims.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import topk
from pallas_kernels.topk_triton import select_topk_triton
from tests.pallas_kernels.test_topk import expected, masked

RNG = np.random.default_rng(3)


def mixed_rows(s, k):
    """9 rows of s scores: normal, bf16-rounded, integer ties, k/2 finite, none finite, signed zeros
    with a few ones, shifted negative, masked at 3/4 of the row, and one value tied everywhere but
    in the last s/30 keys, which hold the top k (the fallback; the buffer would keep only ties)."""
    x = RNG.normal(size=(9, s)).astype(np.float32)
    x[1] = np.asarray(jnp.asarray(x[1] * 3, jnp.bfloat16).astype(jnp.float32))
    x[2] = RNG.integers(-3, 4, size=s)
    x[5] = np.where(RNG.random(s) < 0.5, 0.0, -0.0)
    x[5, RNG.random(s) < 0.05] = 1.0
    x[6] -= 100.0
    tail = max(1, s // 30)
    x[8, :-tail] = 1.0
    x[8, -tail:] = 2.0 + RNG.random(tail)
    return masked(x, [s, s, s, k // 2, 0, s, s, 3 * s // 4, s])


def check(x, k, **kw):
    got = np.asarray(select_topk_triton(jnp.asarray(x), k, interpret=True, **kw))
    assert got.dtype == np.int32 and got.shape == x.shape[:-1] + (k,)
    np.testing.assert_array_equal(got, expected(x, k))
    np.testing.assert_array_equal(got, np.asarray(topk.select_topk(jnp.asarray(x), k)))


@pytest.mark.parametrize("blocks", [{}, {"block": 64, "max_block": 64}], ids=["default", "small_blocks"])
def test_long_rows_sampled_and_fallback(blocks):
    s, k = 3000, 64  # buffer 864 (14 blocks of 64), a sample of 188 (3 blocks of 64)
    x = mixed_rows(s, k)
    ok = np.asarray(topk.sampled_rows_ok(jnp.asarray(x), k))
    assert ok.any() and not ok.all(), ok  # both paths run
    check(x, k, **blocks)


def test_short_rows_and_fewer_keys_than_k():
    check(mixed_rows(50, 7), 7)                  # no sample: the exact select over the row
    check(mixed_rows(20, 64)[:4], 64)             # S < k: -1 past the row's finite scores


def test_odd_length_with_leading_dims():
    x = RNG.normal(size=(2, 3, 701)).astype(np.float32)
    x[1, 2, 100:] = -np.inf
    check(x, 16, block=128)


@pytest.mark.parametrize("kw, match", [({"k": 0}, "k must be >= 1"), ({"k": 4, "block": 100}, "block must be"),
                                       ({"k": 4, "max_block": 8}, "max_block must be")])
def test_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        select_topk_triton(jnp.zeros((2, 40)), interpret=True, **kw)
