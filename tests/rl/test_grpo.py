"""GRPO terms (spec §8) against hand-computed NumPy values; the unbiased KL estimator's gradient
against the exact KL gradient (exact expectation and Monte Carlo) on a toy categorical policy;
off-policy masking on/off; Keep Sampling Mask renormalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.rl import grpo
from deepseek_jax.sampling import log_policy, sample


def test_group_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(grpo.group_advantages(r), [[.5, -.5, -.5, .5], [0, 0, 0, 0], [2.25, -.75, -.75, -.75]])
    std = np.array([0.5, 0.0, np.sqrt(3 * 0.75 ** 2 / 4 + 2.25 ** 2 / 4)])
    want = (r - r.mean(1, keepdims=True)) / (std[:, None] + 1e-6)
    np.testing.assert_allclose(grpo.group_advantages(r, normalize_std=True), want, rtol=1e-5)
    with pytest.raises(ValueError, match="rewards"):
        grpo.group_advantages(np.zeros(4))


def test_sequence_mean_and_surrogate():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(grpo.sequence_mean(x, mask), [1.5, 5.0, 0.0])

    ratio = np.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = np.array([2.0, -1.0])
    obj, clipped = grpo.clipped_surrogate(jnp.log(ratio), jnp.zeros((2, 3)), jnp.asarray(adv),
                                          clip_low=0.2, clip_high=0.28)
    # A > 0: min(r A, clip(r) A) = [0.5*2, 1*2, 1.28*2]; A < 0: [-0.8, -1, -1.5]
    np.testing.assert_allclose(obj, [[1.0, 2.0, 2.56], [-0.8, -1.0, -1.5]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[False, False, True], [True, False, False]])


def test_kl_estimators_values():
    logp, ref, old = np.log([0.5, 0.1]), np.log([0.25, 0.4]), np.log([0.4, 0.2])
    k3 = np.array([0.5 - np.log(0.5) - 1, 4.0 - np.log(4.0) - 1])
    as_j = lambda a: jnp.asarray(a, jnp.float32)[None]
    np.testing.assert_allclose(grpo.kl_estimate(as_j(logp), as_j(ref), as_j(old), "k3")[0], k3, rtol=1e-5)
    np.testing.assert_allclose(grpo.kl_estimate(as_j(logp), as_j(ref), as_j(old), "k1")[0], logp - ref, rtol=1e-5)
    np.testing.assert_allclose(grpo.kl_estimate(as_j(logp), as_j(ref), as_j(old), "unbiased")[0],
                               np.array([0.5 / 0.4, 0.1 / 0.2]) * k3, rtol=1e-5)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo.kl_estimate(as_j(logp), as_j(ref), as_j(old), "k2")


def _toy():
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=6), jnp.float32)
    ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=6), jnp.float32))
    old = jax.nn.log_softmax(jnp.asarray(rng.normal(size=6) * 0.5, jnp.float32))  # a stale sampler
    return theta, ref, old


def _true_kl(theta, ref):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - ref))


def _expected_estimate_grad(theta, ref, old, estimator):
    """∇θ E_{x ~ π_old}[estimate(x)] computed exactly (sum over the 6 actions)."""
    def expected(th):
        logp = jax.nn.log_softmax(th)
        est = grpo.kl_estimate(logp[None], ref[None], old[None], estimator)[0]
        return jnp.sum(jnp.exp(old) * est)
    return jax.grad(expected)(theta)


def test_unbiased_kl_gradient_exact():
    """Off-policy samples (π_old ≠ π_θ): the reweighted K3's expected gradient equals ∇KL(π_θ‖π_ref);
    plain K3 does not (on-policy its gradient is that of the reverse KL)."""
    theta, ref, old = _toy()
    true = jax.grad(_true_kl)(theta, ref)
    np.testing.assert_allclose(_expected_estimate_grad(theta, ref, old, "unbiased"), true, atol=1e-6)
    on_policy = jax.nn.log_softmax(theta)
    np.testing.assert_allclose(_expected_estimate_grad(theta, ref, on_policy, "unbiased"), true, atol=1e-6)
    assert np.abs(_expected_estimate_grad(theta, ref, old, "k3") - true).max() > 0.05
    reverse = jax.grad(lambda th: jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(th))))(theta)
    np.testing.assert_allclose(_expected_estimate_grad(theta, ref, on_policy, "k3"), reverse, atol=1e-6)


def test_unbiased_kl_gradient_monte_carlo():
    """Mean per-sample gradient over 200k draws from π_old vs the exact ∇KL(π_θ‖π_ref)."""
    theta, ref, old = _toy()
    samples = jax.random.categorical(jax.random.key(1), old, shape=(200_000,))

    def mc(th):
        logp = jax.nn.log_softmax(th)[samples]
        return grpo.kl_estimate(logp[None], ref[samples][None], old[samples][None], "unbiased").mean()

    grad, true = jax.grad(mc)(theta), jax.grad(_true_kl)(theta, ref)
    np.testing.assert_allclose(grad, true, atol=0.02)
    assert float(mc(theta)) == pytest.approx(float(_true_kl(theta, ref)), abs=0.02)


def test_offpolicy_mask():
    adv = jnp.array([-1.0, -1.0, 1.0, -1.0])
    old = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    # mean log(π_old/π_θ): 0.693, 0.1, 0.693, 0.693 (second token padding in row 3)
    logp = jnp.log(jnp.array([[0.25, 0.25], [0.5 / np.exp(0.1)] * 2, [0.25, 0.25], [0.25, 0.9]]))
    mask = jnp.array([[1, 1], [1, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(grpo.offpolicy_mask(adv, logp, old, mask, 0.5), [0, 1, 1, 0])
    np.testing.assert_array_equal(grpo.offpolicy_mask(adv, logp, old, mask, 0.05), [0, 0, 1, 0])
    np.testing.assert_array_equal(grpo.offpolicy_mask(adv, logp, old, mask, None), [1, 1, 1, 1])


def test_grpo_loss_by_hand():
    """Two sequences, three tokens; loss and metrics computed by hand in NumPy."""
    logp = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.4]]))
    old = np.log(np.array([[0.4, 0.3, 0.1], [0.4, 0.2, 0.4]]))
    ref = np.log(np.array([[0.4, 0.4, 0.4], [0.2, 0.2, 0.2]]))
    adv = np.array([1.0, -0.5])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    eps_l, eps_h, beta, delta = 0.2, 0.28, 0.1, 0.5
    r = np.exp(logp - old)
    surr = np.minimum(r * adv[:, None], np.clip(r, 1 - eps_l, 1 + eps_h) * adv[:, None])
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    kl = r * k3
    drift = ((old - logp) * mask).sum(1) / mask.sum(1)  # [-0.305, 0.693]
    keep = np.where((adv < 0) & (drift > delta), 0.0, 1.0)
    assert list(keep) == [1.0, 0.0]
    per_seq = ((surr * keep[:, None] - beta * kl) * mask).sum(1) / mask.sum(1)
    args = [jnp.asarray(a, jnp.float32) for a in (logp, old, ref, adv)] + [jnp.asarray(mask)]
    loss, m = grpo.grpo_loss(*args, clip_low=eps_l, clip_high=eps_h, kl_coef=beta, offpolicy_delta=delta)
    np.testing.assert_allclose(loss, -per_seq.mean(), rtol=1e-5)
    np.testing.assert_allclose(m.masked_fraction, 0.5)
    np.testing.assert_allclose(m.clip_fraction, 2 / 5)  # (0, 2): r = 2 > 1.28, A > 0; (1, 0): r = 0.25 < 0.8, A < 0
    np.testing.assert_allclose(m.kl, (kl * mask).sum() / 5, rtol=1e-5)
    # Masking off: the negative-advantage sequence's surrogate comes back.
    loss_off, m_off = grpo.grpo_loss(*args, clip_low=eps_l, clip_high=eps_h, kl_coef=beta, offpolicy_delta=None)
    per_seq_off = ((surr - beta * kl) * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(loss_off, -per_seq_off.mean(), rtol=1e-5)
    assert float(m_off.masked_fraction) == 0.0
    # A dropped sequence gets gradient only from the KL term; β = 0 leaves it none.
    grad = jax.grad(lambda lp: grpo.grpo_loss(lp, *args[1:], kl_coef=0.0, offpolicy_delta=delta)[0])(args[0])
    np.testing.assert_array_equal(grad[1], 0.0)
    assert np.abs(np.asarray(grad[0])).sum() > 0
    with pytest.raises(ValueError, match="advantages"):
        grpo.grpo_loss(*args[:3], args[3][:1], args[4])
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(args[0], args[1], None, args[3], args[4], kl_coef=0.1)


def _kept_ids(logits, opts, pad):
    """The sampler's kept ids per row [R, M + pad], -1 past each row's kept count."""
    out = sample(logits, jax.random.split(jax.random.key(0), logits.shape[0]), **opts)
    ids, counts = np.asarray(out.kept_ids), np.asarray(out.kept_counts)
    ids = np.where(np.arange(ids.shape[1]) < counts[:, None], ids, -1)
    return np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)


def test_token_logprobs_kept_ids():
    """Renormalising over the kept ids equals sampling.log_policy (the sampler's π) at the kept
    tokens, for top-k and top-p, whatever the padding width; the entropy is π's over the kept
    set and has a finite gradient; without ids it is log_softmax(logits / τ)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 11)) * 2, jnp.float32)
    tokens = jnp.asarray(np.argsort(-np.asarray(logits), axis=-1)[:, :2].T)  # [2, 3]: two kept tokens per row
    for opts in ({"temperature": 0.7, "top_k": 4}, {"temperature": 1.3, "top_p": 0.8}):
        want_all = log_policy(logits, **opts)  # [3, V], -inf outside the kept set
        want = np.take_along_axis(np.asarray(want_all), np.asarray(tokens).T, -1).T
        p = np.exp(np.asarray(want_all))
        want_ent = -np.sum(p * np.where(p > 0, np.asarray(want_all), 0.0), -1)
        for pad in (0, 5):
            ids = _kept_ids(logits, opts, pad)
            kept = jnp.broadcast_to(jnp.asarray(ids), (2,) + ids.shape)
            lp, ent = grpo.token_logprobs(jnp.broadcast_to(logits, (2, 3, 11)), tokens, kept,
                                          temperature=opts["temperature"])
            np.testing.assert_allclose(lp, want, rtol=1e-5)
            np.testing.assert_allclose(ent, np.broadcast_to(want_ent, (2, 3)), rtol=1e-5)
    # The entropy is differentiable although padded slots and tokens outside the set are excluded.
    grad = jax.grad(lambda x: grpo.token_logprobs(x, tokens, kept)[1].sum())(jnp.broadcast_to(logits, (2, 3, 11)))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
    lp, ent = grpo.token_logprobs(logits[None], tokens[:1], temperature=2.0)
    want_all = np.asarray(jax.nn.log_softmax(logits / 2.0))
    np.testing.assert_allclose(lp[0], np.take_along_axis(want_all, np.asarray(tokens[0])[:, None], -1)[:, 0],
                               rtol=1e-5)
    np.testing.assert_allclose(ent[0], -np.sum(np.exp(want_all) * want_all, -1), rtol=1e-5)
    with pytest.raises(ValueError, match="kept_ids"):
        grpo.token_logprobs(logits[None], tokens[:1], jnp.zeros((1, 2, 4), jnp.int32))
