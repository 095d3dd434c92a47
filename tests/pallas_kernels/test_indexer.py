"""The indexer-scores Pallas kernel + chunked top-k (interpret mode on CPU) equals the reference."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops, tiles
from pallas_kernels.chunking import causal_segments
from pallas_kernels.indexer import triton
from pallas_kernels.indexer.reference import indexer_scores, indexer_topk_reference
from pallas_kernels.indexer.triton import indexer_topk_triton


def same_selection(got, want, q, k, w, k_scale):
    """Equal index sets (kernels list them by ascending index, the reference by score) with the same
    -1 padding, or, where summation order flips a near-tie, equal scores (rtol 1e-5)."""
    got_sorted, want_sorted = np.sort(got, -1), np.sort(want, -1)  # -1 padding sorts first
    if np.array_equal(got_sorted, want_sorted):
        return True
    scores = np.asarray(indexer_scores(q, k, w, k_scale))
    pick = lambda idx: np.where(idx >= 0, np.take_along_axis(scores, np.maximum(idx, 0), -1), -np.inf)
    return (np.allclose(np.sort(pick(got), -1), np.sort(pick(want), -1), rtol=1e-5)
            and np.array_equal(got_sorted < 0, want_sorted < 0))


def ascending_then_padding(idx):
    """Each row lists its valid indices in increasing order, then -1s (the kernels' order)."""
    valid = idx >= 0
    gaps = np.diff(np.where(valid, idx, np.iinfo(np.int32).max).astype(np.int64), axis=-1)
    return bool(np.all(valid[..., :-1] >= valid[..., 1:]) and np.all(gaps[valid[..., 1:]] > 0))


def random_inputs(b, t, s, h, d, k_len, dtype):
    """Random indexer inputs (seeded by T): q, k in `dtype`, f32 head weights and key scales, k_len."""
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s, d)), dtype)
    w = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    k_scale = jnp.asarray(rng.uniform(0.5, 2, size=(b, s)), jnp.float32)
    return q, k, w, k_scale, None if k_len is None else jnp.asarray(k_len)


@pytest.mark.parametrize("b, t, s, h, d, topk, q_offset, k_len, chunk", [
    (2, 19, 19, 5, 24, 5, 0, None, 8),        # odd T, chunk not dividing T
    (2, 13, 22, 8, 32, 8, 9, [22, 11], 16),   # decode-style offset, per-sequence lengths
    (1, 9, 9, 3, 16, 32, 0, None, 4),         # S < topk: -1 padding
    (1, 40, 40, 16, 64, 12, 0, None, 40),     # more heads, one chunk
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("key_loop", [False, True])
def test_topk_matches_reference(b, t, s, h, d, topk, q_offset, k_len, chunk, dtype, key_loop):
    q, k, w, k_scale, kl = random_inputs(b, t, s, h, d, k_len, dtype)
    got = indexer_topk_triton(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=kl, chunk_size=chunk,
                              interpret=True, block_t=4, block_s=16, key_loop=key_loop)
    want = indexer_topk_reference(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=kl)
    assert got.dtype == jnp.int32 and got.shape == want.shape
    assert same_selection(np.asarray(got), np.asarray(want), q, k, w, k_scale)
    assert ascending_then_padding(np.asarray(got))


def test_causal_segments():
    """Runs of whole chunks covering [0, T), each with the keys its last query sees; equal widths merged."""
    assert causal_segments(64, 64, 8, 4) == [(0, 16, 16), (16, 32, 32), (32, 48, 48), (48, 64, 64)]
    assert causal_segments(19, 19, 8, 8) == [(0, 8, 8), (8, 16, 16), (16, 19, 19)]  # 3 chunks: at most 3 runs
    assert causal_segments(64, 40, 8, 4) == [(0, 16, 16), (16, 32, 32), (32, 64, 40)]  # S < T: widths cap at S
    assert causal_segments(64, 64, 8, 4, q_offset=20) == [(0, 16, 36), (16, 32, 52), (32, 64, 64)]
    assert causal_segments(8, 100, 8, 4, q_offset=99) == [(0, 8, 100)]  # decode-style: one run of all keys
    assert causal_segments(64, 64, 8, 1) == [(0, 64, 64)]
    assert causal_segments(4, 64, 8, 4, q_offset=-10) == [(0, 4, 1)]  # no visible key: width 1, all masked
    for t, s, chunk, g, off in [(1000, 900, 64, 8, 3), (77, 200, 5, 6, 50), (513, 513, 512, 8, 0)]:
        runs = causal_segments(t, s, chunk, g, off)
        assert runs[0][0] == 0 and runs[-1][1] == t and all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert all(start % chunk == 0 and width == min(s, stop + off) for start, stop, width in runs)


@pytest.mark.parametrize("segments, q_offset", [(8, 0), (3, 5)])  # 6 runs, the first narrower than topk; 3
def test_causal_runs_equal_one_run(segments, q_offset):
    """Scoring each causal run against only its keys gives the same indices as one run (every chunk against the
    keys the last query sees), with q_offset, per-row k_len, a run narrower than topk (-1 padding) and a ragged
    last chunk."""
    q, k, w, k_scale, kl = random_inputs(2, 45, 60, 4, 16, [60, 23], jnp.float32)
    run = lambda segments: np.asarray(indexer_topk_triton(
        q, k, w, topk=10, k_scale=k_scale, q_offset=q_offset, k_len=kl, chunk_size=8, segments=segments,
        interpret=True, block_t=4, block_s=16))
    want = indexer_topk_reference(q, k, w, topk=10, k_scale=k_scale, q_offset=q_offset, k_len=kl)
    got = run(segments)
    assert same_selection(got, np.asarray(want), q, k, w, k_scale) and ascending_then_padding(got)
    np.testing.assert_array_equal(got, run(1))


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
def test_exact_zero_ties_keep_the_lowest_index(impl):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 12, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 12, 16)), jnp.float32)
    got = ops.indexer_topk(q, k, jnp.zeros((1, 12, 4)), topk=4, impl=impl, interpret=True)
    for t in range(12):
        assert np.asarray(got)[0, t].tolist() == list(range(min(t + 1, 4))) + [-1] * max(0, 3 - t)


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
def test_fp8_inputs_match_reference(impl):
    """e4m3 q and k with per-key scales (the model's index_fp8 path) take the kernels, not the reference."""
    q, k, w, k_scale, _ = random_inputs(2, 19, 19, 8, 32, None, jnp.float32)
    q8, k8 = q.astype(jnp.float8_e4m3fn), k.astype(jnp.float8_e4m3fn)
    got = ops.indexer_topk(q8, k8, w, topk=5, k_scale=k_scale, impl=impl, interpret=True)
    want = indexer_topk_reference(q8, k8, w, topk=5, k_scale=k_scale)
    assert same_selection(np.asarray(got), np.asarray(want), q8, k8, w, k_scale)
    assert ascending_then_padding(np.asarray(got))  # the kernels' order: the reference was not taken


# Per batch row (block_t 4, block_s 16; 4 heads pad to 16, D = 16) the query chunk has 256·chunk elements, k 16·Sp.
@pytest.mark.parametrize("s, chunk, limit, group", [
    (100, 4, 4096, 2),  # k [3, 112, 16] (5376 elements) in (limit, 2·limit]: groups of 2, the last shifted back
    (40, 8, 4096, 2),   # the query chunk [3, 8, 16, 16] (6144) in range, k (2304) not
    (40, 8, 2048, 1),   # k (2304) in range; then the chunk of 2 rows (4096) is: groups of 1
])
def test_fp8_batch_groups_equal_one_call(monkeypatch, s, chunk, limit, group):
    """With the offset limit lowered (tiles.OFFSET_LIMIT) the batch runs in groups: same indices as one call."""
    q, k, w, k_scale, kl = random_inputs(3, 16, s, 4, 16, [s, 17, 29], jnp.float32)
    q8, k8 = q.astype(jnp.float8_e4m3fn), k.astype(jnp.float8_e4m3fn)
    # q_offset = S: every query sees all S keys, so every call gets them (the sizes above).
    run = lambda: np.asarray(indexer_topk_triton(q8, k8, w, topk=6, k_scale=k_scale, q_offset=s, k_len=kl,
                                                 chunk_size=chunk, interpret=True, block_t=4, block_s=16))
    want = run()
    rows = []
    scores = triton.indexer_scores_triton
    monkeypatch.setattr(triton, "indexer_scores_triton", lambda q, *a, **kw: rows.append(q.shape[0]) or scores(q, *a, **kw))
    monkeypatch.setattr(tiles, "OFFSET_LIMIT", limit)
    got = run()
    assert set(rows) == {group}
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float8_e4m3fn])
def test_key_loop_scores_equal_the_grid_kernel(dtype):
    """The key-loop kernel computes each tile as the grid kernel does: bitwise equal scores (fp8 with key scales
    too), with ragged T and S, q_offset > 0 and per-row k_len of 0, below one block and below T + q_offset."""
    q, k, w, k_scale, kl = random_inputs(4, 13, 37, 5, 24, [37, 0, 9, 20], jnp.float32)
    q, k = q.astype(dtype), k.astype(dtype)
    run = lambda key_loop: np.asarray(triton.indexer_scores_triton(
        q, k, w, k_scale, kl, jnp.arange(13), q_offset=5, block_t=4, block_s=16, key_loop=key_loop, interpret=True))
    got, want = run(True), run(False)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[1] == -np.inf) and np.all(got[2][:, 9:] == -np.inf)


def test_key_loop_topk_fp8_k_len_ties_match_reference():
    """key_loop=True through indexer_topk_triton: fp8 with scales and per-row k_len (0, < topk) equals the
    reference; exact zero ties keep the lowest indices."""
    q, k, w, k_scale, kl = random_inputs(3, 19, 45, 8, 32, [45, 0, 3], jnp.float32)
    q8, k8 = q.astype(jnp.float8_e4m3fn), k.astype(jnp.float8_e4m3fn)
    got = indexer_topk_triton(q8, k8, w, topk=6, k_scale=k_scale, q_offset=7, k_len=kl, chunk_size=8, interpret=True,
                              block_t=4, block_s=16, key_loop=True)
    want = indexer_topk_reference(q8, k8, w, topk=6, k_scale=k_scale, q_offset=7, k_len=kl)
    assert same_selection(np.asarray(got), np.asarray(want), q8, k8, w, k_scale)
    assert ascending_then_padding(np.asarray(got))
    assert np.all(np.asarray(got)[1] == -1) and np.all(np.asarray(got)[2, :, 3:] == -1)
    ties = indexer_topk_triton(q, k, jnp.zeros_like(w), topk=6, k_len=kl, interpret=True, block_t=4, block_s=16,
                               key_loop=True)
    np.testing.assert_array_equal(np.asarray(ties)[0, :, :], np.where(np.arange(6) <= np.arange(19)[:, None],
                                                                      np.arange(6), -1))


@pytest.mark.parametrize("s", [60, 1200])  # rows too short to sample; long enough (buffer 560 at topk 8)
def test_topk_kernel_equals_select_topk(s):
    """topk_kernel=True (select_topk_triton on each chunk's scores) returns select_topk's indices, order and -1
    slots included: 3 causal runs (q_offset), per-row k_len."""
    q, k, w, k_scale, kl = random_inputs(2, 24, s, 4, 16, [s, s // 3], jnp.float32)
    run = lambda topk_kernel: np.asarray(indexer_topk_triton(
        q, k, w, topk=8, k_scale=k_scale, q_offset=s - 24, k_len=kl, chunk_size=8, topk_kernel=topk_kernel,
        interpret=True, block_t=4, block_s=128))
    np.testing.assert_array_equal(run(True), run(False))


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic"])
def test_ops_indexer_topk_takes_a_scalar_k_len_for_every_sequence(impl):
    rng = np.random.default_rng(0)
    q, k, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 2, 8), (2, 6, 8), (2, 5, 2)))
    run = lambda k_len: np.sort(ops.indexer_topk(q, k, w, topk=4, k_len=k_len, impl=impl, interpret=True), axis=-1)
    np.testing.assert_array_equal(run(3), run(jnp.array([3, 3])))
    assert (run(3) < 3).all()
