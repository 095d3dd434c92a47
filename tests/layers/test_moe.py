"""DeepSeekMoE (spec §5) against plain-NumPy oracles written from the spec text.

route(): sigmoid scores, selection on score + bias, group-limited (group score = sum of the
top-2 biased scores, keep `topk_group` groups), weights = unbiased scores of the chosen experts
normalised to 1, × routed_scaling_factor. dispatch_experts(): Σ_k w_k · SwiGLU_e(x). MoE aux:
per-expert loads and the sequence-wise balance statistic Σ_i f_i P_i. Gradients: the bias is
selection-only (exactly zero gradient); every other parameter gets a finite, non-zero one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig
from deepseek_jax.layers.experts import dispatch_experts
from deepseek_jax.layers.moe import MoE, route


# ----------------------------------------------------------------------------- NumPy oracles
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_route(scores, bias, *, n_group, topk_group, top_k, scaling):
    """Spec §5 gate, one token at a time: returns (experts [N, K], weights [N, K])."""
    n, e = scores.shape
    per_group = e // n_group
    experts = np.zeros((n, top_k), np.int64)
    weights = np.zeros((n, top_k), np.float64)
    for t in range(n):
        biased = scores[t].astype(np.float64) + bias.astype(np.float64)
        allowed = np.ones(e, bool)
        if n_group > 1:
            groups = biased.reshape(n_group, per_group)
            group_score = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
            kept = np.argsort(-group_score, kind="stable")[:topk_group]
            allowed = np.zeros((n_group, per_group), bool)
            allowed[kept] = True
            allowed = allowed.reshape(e)
        candidates = np.where(allowed, biased, -np.inf)
        chosen = np.argsort(-candidates, kind="stable")[:top_k]
        assert allowed[chosen].all()
        w = scores[t, chosen].astype(np.float64)
        experts[t] = chosen
        weights[t] = w / w.sum() * scaling
    return experts, weights


def np_swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate
    return ((g * _sigmoid(g)) * (x @ w_up)) @ w_down


def np_dispatch(x, experts, weights, w_gate, w_up, w_down):
    """Σ_k w_k · down_e(silu(x·Wg_e) ⊙ (x·Wu_e)), token by token, in float64."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t]):
            out[t] += w * np_swiglu(x[t], w_gate[e], w_up[e], w_down[e])
    return out


def _sorted_by_expert(experts, weights):
    order = np.argsort(experts, axis=1)
    return np.take_along_axis(experts, order, 1), np.take_along_axis(weights, order, 1)


# ----------------------------------------------------------------------------- route()
# (n_experts, n_group, topk_group, top_k)
ROUTE_CASES = [
    (8, 4, 2, 2),     # the tiny preset
    (16, 1, 1, 3),    # no group limit
    (32, 1, 1, 8),
    (32, 8, 3, 4),
    (64, 8, 4, 8),    # the 671B shape, scaled down (8 groups, keep 4, top-8)
    (24, 3, 3, 5),    # all groups kept
    (12, 6, 1, 2),    # one group kept, 2 experts per group
]


@pytest.mark.parametrize("n_experts,n_group,topk_group,top_k", ROUTE_CASES)
def test_route_matches_numpy_gate(n_experts, n_group, topk_group, top_k):
    """route() picks the same expert set per token with the same weights as the spec's gate."""
    rng = np.random.default_rng(n_experts * 100 + n_group * 10 + top_k)
    n, scaling = 257, 2.5
    scores = _sigmoid(rng.normal(size=(n, n_experts))).astype(np.float32)
    bias = (0.3 * rng.normal(size=n_experts)).astype(np.float32)
    kw = dict(n_group=n_group, topk_group=topk_group, top_k=top_k, scaling=scaling)

    weights, experts = jax.jit(lambda s, b: route(s, b, **kw))(scores, bias)
    weights, experts = np.asarray(weights), np.asarray(experts)
    assert experts.shape == (n, top_k) and experts.dtype == np.int32
    assert weights.shape == (n, top_k) and weights.dtype == np.float32
    ref_experts, ref_weights = np_route(scores, bias, **kw)

    got_e, got_w = _sorted_by_expert(experts, weights)
    ref_e, ref_w = _sorted_by_expert(ref_experts, ref_weights)
    np.testing.assert_array_equal(got_e, ref_e)
    np.testing.assert_allclose(got_w, ref_w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(weights.sum(1), scaling, rtol=1e-6)

    # The case must exercise the bias (selection on s + b, not on s) and, with groups, the
    # group limit (not the plain top-k of the biased scores).
    unbiased_e, _ = np_route(scores, np.zeros_like(bias), **kw)
    assert (np.sort(unbiased_e, 1) != ref_e).any(axis=1).mean() > 0.05
    if topk_group < n_group:
        plain_e, _ = np_route(scores, bias, n_group=1, topk_group=1, top_k=top_k, scaling=scaling)
        assert (np.sort(plain_e, 1) != ref_e).any(axis=1).mean() > 0.05


# ----------------------------------------------------------------------------- dispatch_experts()
@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (16, 5)])
def test_dispatch_experts_matches_numpy_loop(n_experts, top_k):
    """dispatch_experts() = Σ_k w_k · SwiGLU_{e_k}(x), incl. experts that receive no token."""
    rng = np.random.default_rng(7 + n_experts)
    n, d, f = 37, 24, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    # Distinct experts per token drawn from all but the last two experts (which stay empty).
    experts = np.stack([rng.permutation(n_experts - 2)[:top_k] for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(n, top_k)).astype(np.float32)
    w_gate = (rng.normal(size=(n_experts, d, f)) / np.sqrt(d)).astype(np.float32)
    w_up = (rng.normal(size=(n_experts, d, f)) / np.sqrt(d)).astype(np.float32)
    w_down = (rng.normal(size=(n_experts, f, d)) / np.sqrt(f)).astype(np.float32)

    got = np.asarray(jax.jit(dispatch_experts)(x, experts, weights, w_gate, w_up, w_down))
    ref = np_dispatch(x, experts, weights, w_gate, w_up, w_down)
    assert got.shape == (n, d) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- MoE module
def _moe_setup(seed=0, b=3, t=11):
    """Tiny-preset MoE, input x [b, t, D] and params drawn with NumPy (shapes from MoE.init).

    NumPy draws keep the test fast (no compiled initialiser) and give O(1) gate logits, so the
    scores, not only the bias, decide the routing; the bias is non-zero so that selection
    (s + b) and weighting (s) differ.
    """
    cfg = ModelConfig.preset("tiny")
    assert cfg.dtype == "float32" and cfg.n_group > 1
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
    shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.PRNGKey(0), x)["params"])

    def draw(leaf):
        fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    params = jax.tree.map(draw, shapes)
    params["gate_bias"] = (0.2 * rng.normal(size=shapes["gate_bias"].shape)).astype(np.float32)
    return cfg, jnp.asarray(x), params


def test_moe_aux_expert_load_and_balance():
    """aux["expert_load"] is the bincount of chosen experts (sums to N·K); aux["balance"] is the
    spec's Σ_i f_i P_i per sequence, averaged over sequences."""
    cfg, x, params = _moe_setup()
    b, t, d = x.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    y, aux = jax.jit(lambda p, x: MoE(cfg).apply({"params": p}, x))(params, x)
    assert y.shape == x.shape

    xs = np.asarray(x, np.float64).reshape(b * t, d)
    scores = _sigmoid(xs @ np.asarray(params["gate"], np.float64))
    experts, _ = np_route(scores, np.asarray(params["gate_bias"]), n_group=cfg.n_group,
                          topk_group=cfg.topk_group, top_k=k, scaling=cfg.routed_scaling_factor)

    load = np.asarray(aux["expert_load"])
    assert load.shape == (e,) and load.sum() == b * t * k
    np.testing.assert_array_equal(load, np.bincount(experts.reshape(-1), minlength=e))

    balance = []
    for seq in range(b):
        rows = slice(seq * t, (seq + 1) * t)
        f_i = e / (k * t) * np.bincount(experts[rows].reshape(-1), minlength=e)
        s = scores[rows]
        p_i = (s / s.sum(1, keepdims=True)).mean(0)
        balance.append(np.sum(f_i * p_i))
    assert np.asarray(aux["balance"]).shape == ()
    np.testing.assert_allclose(float(aux["balance"]), np.mean(balance), rtol=1e-5)


def test_moe_gradients():
    """Gradients through MoE (output and balance statistic) reach the expert weights and the
    gate, finite and non-zero; the selection-only bias gets exactly zero gradient."""
    cfg, x, params = _moe_setup(seed=3)
    target = np.random.default_rng(11).normal(size=x.shape).astype(np.float32)

    def loss(p):
        y, aux = MoE(cfg).apply({"params": p}, x)
        return jnp.mean((y - target) ** 2) + 0.1 * aux["balance"], aux

    grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    for name in ("w_gate", "w_up", "w_down", "gate"):
        g = np.asarray(grads[name])
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name
    # Every expert that received a token gets a gradient; unused experts get none.
    used = np.asarray(aux["expert_load"]) > 0
    assert used.any()
    per_expert = np.abs(np.asarray(grads["w_down"])).reshape(cfg.n_routed_experts, -1).max(1)
    np.testing.assert_array_equal(per_expert > 0, used)
    g_bias = np.asarray(grads["gate_bias"])
    assert g_bias.shape == (cfg.n_routed_experts,)
    np.testing.assert_array_equal(g_bias, np.zeros_like(g_bias))
