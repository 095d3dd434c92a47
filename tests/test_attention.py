"""DSA references and the dense/sparse dispatch (spec §2-§3, §11.4, §11.12)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer, forward
from deepseek_jax.attention import dense_mha, mla_attention, sparse_mla_absorbed
from pallas_kernels import ops


def brute_force_topk(q, k, w, topk, k_scale=None, q_offset=0, k_len=None):
    """Full [T, S] scores in float64; order: score descending, then lowest index; -1 padding."""
    q, k, w = (np.asarray(a, np.float64) for a in (q, k, w))
    b, t, _, _ = q.shape
    s = k.shape[1]
    scores = np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", q, k), 0))
    if k_scale is not None:
        scores = scores * np.asarray(k_scale, np.float64)[:, None, :]
    k_len = np.full(b, s) if k_len is None else np.asarray(k_len)
    out = np.full((b, t, topk), -1, np.int32)
    for bi in range(b):
        for ti in range(t):
            valid = [j for j in range(s) if j <= ti + q_offset and j < k_len[bi]]
            ranked = sorted(valid, key=lambda j: (-scores[bi, ti, j], j))[:topk]
            out[bi, ti, :len(ranked)] = ranked
    return out


def random_indexer_inputs(rng, b=2, t=19, s=19, h=4, d=16):
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, d)).astype(np.float32)
    w = rng.normal(size=(b, t, h)).astype(np.float32)
    return q, k, w


@pytest.mark.parametrize("topk, chunk, key_block, q_offset, k_len, s", [
    (5, 4, 4096, 0, None, 19),       # T not a multiple of the query chunk
    (8, 7, 5, 0, [19, 11], 19),      # per-sequence key lengths; keys in blocks (running top-k)
    (6, 16, 4, 3, None, 22),         # queries offset into a longer key range (decode-style)
    (32, 5, 6, 0, None, 19),         # S < topk: trailing -1 slots
])
def test_indexer_topk_matches_brute_force(topk, chunk, key_block, q_offset, k_len, s):
    rng = np.random.default_rng(topk)
    q, k, w = random_indexer_inputs(rng, s=s)
    k_scale = rng.uniform(0.5, 2.0, size=(2, s)).astype(np.float32)
    got = ops.indexer_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), topk=topk, k_scale=jnp.asarray(k_scale),
                           q_offset=q_offset, k_len=None if k_len is None else jnp.asarray(k_len), chunk_size=chunk,
                           key_block=key_block)
    # The same set; the order within a row is the implementation's (the kernels list indices ascending).
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(brute_force_topk(q, k, w, topk, k_scale, q_offset, k_len), -1))


def test_ties_go_to_the_lowest_index():
    """ReLU scores are often exactly 0; every path must keep the same tokens (spec §11.12)."""
    rng = np.random.default_rng(0)
    q, k, w = random_indexer_inputs(rng, t=12, s=12)
    w[:, :, :] = 0.0  # every score ties at 0
    got = np.asarray(ops.indexer_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), topk=4, chunk_size=5,
                                      key_block=3))
    for t in range(12):
        expected = list(range(min(t + 1, 4))) + [-1] * max(0, 4 - (t + 1))
        assert got[0, t].tolist() == expected


def test_indexer_topk_independent_of_chunking():
    rng = np.random.default_rng(1)
    q, k, w = random_indexer_inputs(rng, t=37, s=37)
    w[:, :, :2] = 0.0  # more exact-zero ties
    q, k, w = (jnp.asarray(a) for a in (q, k, w))
    ref = ops.indexer_topk(q, k, w, topk=9, chunk_size=37)
    for chunk, key_block in ((1, 37), (6, 5), (16, 9), (64, 1)):
        np.testing.assert_array_equal(ops.indexer_topk(q, k, w, topk=9, chunk_size=chunk, key_block=key_block), ref)


def test_sparse_mla_matches_masked_dense_softmax():
    rng = np.random.default_rng(2)
    b, t, s, h, d, v, kk = 2, 11, 15, 3, 24, 16, 6
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    kv = rng.normal(size=(b, s, d)).astype(np.float32)
    idx = np.stack([np.stack([rng.permutation(s)[:kk] for _ in range(t)]) for _ in range(b)]).astype(np.int32)
    idx[:, :, -2:] = -1  # unused slots
    idx[0, 3, :] = -1    # a query with nothing selected attends to nothing (zeros)
    got = np.asarray(ops.sparse_mla(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), scale=0.3, v_dim=v,
                                    chunk_size=4))
    expected = np.zeros((b, t, h, v), np.float32)
    for bi in range(b):
        for ti in range(t):
            rows = [j for j in idx[bi, ti] if j >= 0]
            if not rows:
                continue
            logits = 0.3 * q[bi, ti] @ kv[bi, rows].T  # [H, K]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            expected[bi, ti] = (p / p.sum(-1, keepdims=True)) @ kv[bi, rows, :v]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_absorbed_mode_equals_mha_mode():
    """MQA/absorbed attention over every causal key == per-head MHA attention (spec §2)."""
    rng = np.random.default_rng(3)
    b, t, h, nope, rope, c, v = 2, 9, 4, 16, 8, 32, 12
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    q_nope, q_rope, c_kv, k_rope, kv_b = f(b, t, h, nope), f(b, t, h, rope), f(b, t, c), f(b, t, rope), f(c, h, nope + v)
    causal = np.where(np.arange(t)[None, :] <= np.arange(t)[:, None], np.arange(t)[None, :], -1)
    indices = jnp.asarray(np.broadcast_to(causal, (b, t, t)).astype(np.int32))
    mha = dense_mha(q_nope, q_rope, c_kv, k_rope, kv_b, scale=0.2, nope_dim=nope)
    absorbed = sparse_mla_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, indices, scale=0.2, nope_dim=nope,
                                   chunk_size=4)
    np.testing.assert_allclose(absorbed, mha, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 40)), jnp.int32)
    return cfg, jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)["params"], tokens


def test_sparse_equals_dense_when_t_le_topk(tiny):
    cfg, params, tokens = tiny
    short = tokens[:, :cfg.index_topk]
    sparse = forward(params, short, cfg, attention="sparse")
    dense = forward(params, short, cfg, attention="dense")
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)


def test_model_with_the_sparse_mla_kernel(tiny):
    """attention_impl="pallas" (the kernel, interpreted on CPU) gives the reference's logits and gradients."""
    cfg, params, tokens = tiny
    kernel_cfg = cfg.replace(attention_impl="pallas")
    loss = lambda c: jax.jit(jax.value_and_grad(lambda p: jnp.sum(forward(p, tokens, c, attention="sparse") ** 2)))
    (ref_loss, ref_grad), (k_loss, k_grad) = loss(cfg.replace(attention_impl="reference"))(params), loss(kernel_cfg)(params)
    np.testing.assert_allclose(k_loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(k_grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_auto_mode_switches_at_index_topk(tiny):
    cfg, params, tokens = tiny
    for t in (cfg.index_topk, cfg.index_topk + 1):
        auto = forward(params, tokens[:, :t], cfg)
        expected = forward(params, tokens[:, :t], cfg, attention="sparse" if t > cfg.index_topk else "dense")
        np.testing.assert_array_equal(auto, expected)
    with pytest.raises(ValueError, match="attention mode"):
        forward(params, tokens, cfg, attention="flash")


def test_sparse_selection_is_causal_and_padded(tiny):
    cfg, params, tokens = tiny
    apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x, return_indices=True, with_mtp=False))
    _, aux = apply(params, tokens)
    idx = np.asarray(aux["indices"]["moe_layers"])  # [L, B, T, K]
    t = np.arange(tokens.shape[1])[None, None, :, None]
    assert np.all(idx <= t) and np.all(idx >= -1)
    assert np.all((idx >= 0).sum(-1) == np.minimum(t[..., 0] + 1, cfg.index_topk))


def _sparse_block_temp_bytes(cfg, t):
    b, h = 1, cfg.num_attention_heads
    shapes = [(b, t, h, cfg.qk_nope_head_dim), (b, t, h, cfg.qk_rope_head_dim), (b, t, cfg.kv_lora_rank),
              (b, t, cfg.qk_rope_head_dim), (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
              (b, t, cfg.index_n_heads, cfg.index_head_dim), (b, t, cfg.index_head_dim), (b, t, cfg.index_n_heads)]

    def run(q_nope, q_rope, c_kv, k_rope, kv_b, iq, ik, iw):
        return mla_attention(q_nope, q_rope, c_kv, k_rope, kv_b, (iq, ik, iw, None), cfg=cfg, mode="sparse")[0]

    stats = jax.jit(run).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().memory_analysis()
    if stats is None:
        pytest.skip("backend reports no memory analysis")
    return stats.temp_size_in_bytes


def test_sparse_attention_memory_is_not_quadratic():
    """Compiled temp memory of the sparse block grows ~linearly in T and, at T=16K, is a small
    fraction of one [T, T] fp32 array."""
    cfg = ModelConfig.preset("tiny", index_topk=64, attention_chunk_size=64)
    small, large = _sparse_block_temp_bytes(cfg, 4096), _sparse_block_temp_bytes(cfg, 16384)
    assert large < 4 * small, (small, large)            # 4x the tokens: quadratic would be 16x
    assert large < 0.1 * 16384**2 * 4, large             # measured ~5.6 % (CPU, opt level 0)


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic"])
@pytest.mark.parametrize("t, s", [(0, 5), (3, 0), (0, 0)])
def test_ops_take_no_query_or_no_key(t, s, impl):
    """Every implementation returns the known result (-1 slots; zero attention, zero gradients) rather than failing
    in its grid or chunking; before, each raised its own error (ZeroDivisionError, out-of-range slices)."""
    q, k, w = jnp.ones((2, t, 2, 16)), jnp.ones((2, s, 16)), jnp.ones((2, t, 2))
    np.testing.assert_array_equal(ops.indexer_topk(q, k, w, topk=4, impl=impl, interpret=True), np.full((2, t, 4), -1))
    decode_idx = ops.indexer_topk_decode(q, k[None], w, 0, jnp.zeros((2, t), jnp.int32), topk=4, impl=impl,
                                         interpret=True)
    np.testing.assert_array_equal(decode_idx, np.full((2, t, 4), -1))
    q, kv, idx = jnp.ones((2, t, 2, 48)), jnp.ones((2, s, 48)), jnp.zeros((2, t, 4), jnp.int32)
    loss = lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.1, v_dim=32, impl=impl, interpret=True))
    value, (dq, dkv) = jax.value_and_grad(loss, argnums=(0, 1))(q, kv)
    assert value == 0 and not dq.any() and not dkv.any() and dkv.shape == kv.shape
    out = ops.sparse_mla_decode(q, kv[None], 0, idx, scale=0.1, v_dim=32, impl=impl, interpret=True)
    assert out.shape == (2, t, 2, 32) and not out.any()


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic"])
def test_attention_over_no_selected_slot(impl):
    """K = 0 (no slot) is zero attention with zero gradients in every implementation (each failed its own way)."""
    q, kv, idx = jnp.ones((2, 3, 2, 48)), jnp.ones((2, 5, 48)), jnp.zeros((2, 3, 0), jnp.int32)
    loss = lambda q_, kv_: jnp.sum(ops.sparse_mla(q_, kv_, idx, scale=0.1, v_dim=32, impl=impl, interpret=True))
    value, (dq, dkv) = jax.value_and_grad(loss, argnums=(0, 1))(q, kv)
    assert value == 0 and not dq.any() and not dkv.any() and dkv.shape == kv.shape
    out = ops.sparse_mla_decode(q, kv[None], 0, idx, scale=0.1, v_dim=32, impl=impl, interpret=True)
    assert out.shape == (2, 3, 2, 32) and not out.any()


def test_ops_reject_bad_input():
    q, k, w = (jnp.zeros(s) for s in ((1, 4, 2, 8), (1, 4, 8), (1, 4, 2)))
    with pytest.raises(ValueError, match="impl"):
        ops.sparse_mla(q, k, jnp.zeros((1, 4, 2), jnp.int32), scale=1.0, v_dim=4, impl="cuda")
    with pytest.raises(ValueError, match="shapes disagree"):
        ops.indexer_topk(q, jnp.zeros((1, 4, 7)), w, topk=2)
    # Shapes every implementation accepts, or an error before any runs (the kernels failed deep inside, or
    # read past the ends, on per-query k_len and mis-sized k_scale).
    for kwargs, match in (({"k_len": jnp.zeros((1, 4), jnp.int32)}, "k_len: expected a scalar or"),
                          ({"k_len": jnp.zeros((2,), jnp.int32)}, "k_len: expected a scalar or"),
                          ({"k_scale": jnp.ones((1, 3))}, r"k_scale: expected \[B, S\]"),
                          ({"topk": 0}, "topk: expected a positive int"),
                          ({"topk": 2.0}, "topk: expected a positive int")):
        with pytest.raises(ValueError, match=match):
            ops.indexer_topk(q, k, w, **({"topk": 2} | kwargs))
    with pytest.raises(ValueError, match="shapes disagree"):
        ops.sparse_mla(q, k, jnp.zeros((1, 4, 2), jnp.int32), scale=1.0, v_dim=16)
