"""Losses against direct numpy computations of the spec's formulas (spec §4-§6)."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import losses


def _np_ce(logits, targets):
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_mtp_loss_alignment():
    """Depth k at position i is scored against token i + k + 1 = targets[i + k]."""
    rng = np.random.default_rng(0)
    depth, b, t, v = 2, 2, 7, 11
    logits = rng.normal(size=(depth, b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    mask = (rng.random((b, t)) > 0.2).astype(np.float32)
    want = 0
    for k in range(1, depth + 1):
        nll = _np_ce(logits[k - 1, :, : t - k], targets[:, k:])
        want += (nll * mask[:, k:]).sum() / mask[:, k:].sum()
    want *= 0.3 / depth
    got = losses.mtp_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 0.3)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_balance_loss_sums_layers():
    assert np.isclose(float(losses.balance_loss(jnp.array([1.0, 2.0, 3.0]), 1e-4)), 6e-4)


def test_head_summed_probs_and_kl():
    """Per-head softmax over valid keys, summed over heads, L1-normalised; KL(p ‖ softmax(I))."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32)  # [T, H, S]
    valid = np.tril(np.ones((3, 6), bool), k=2)               # row t sees keys <= t + 2
    scores = rng.normal(size=(3, 6)).astype(np.float32)
    p = np.zeros((3, 6))
    q = np.zeros((3, 6))
    for t in range(3):
        v = valid[t]
        e = np.exp(logits[t][:, v] - logits[t][:, v].max(-1, keepdims=True))
        summed = (e / e.sum(-1, keepdims=True)).sum(0)
        p[t, v] = summed / summed.sum()
        es = np.exp(scores[t, v] - scores[t, v].max())
        q[t, v] = es / es.sum()
    got_p = losses.head_summed_probs(jnp.asarray(logits), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got_p), p, atol=1e-6)
    kl = np.array([(p[t, valid[t]] * np.log(p[t, valid[t]] / q[t, valid[t]])).sum() for t in range(3)])
    got_kl = losses.indexer_kl(got_p, jnp.asarray(scores), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got_kl), kl, rtol=1e-4, atol=1e-6)
    # The KL vanishes when the indexer's distribution is the target, and its gradient stays finite.
    same = losses.indexer_kl(got_p, jnp.log(jnp.where(valid, got_p, 1.0)), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
    grad = jax.grad(lambda s: losses.indexer_kl(got_p, s, jnp.asarray(valid)).sum())(jnp.asarray(scores))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~valid] == 0)
