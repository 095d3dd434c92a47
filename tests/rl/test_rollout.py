"""Rollouts (spec §8): G samples per prompt through generate, the training batch layout, and
the training-side log-probabilities: with unchanged params, the forward replaying the sampler's
routes (Keep Routing) and renormalised over its kept sets (Keep Sampling Mask) gives the
sampler's recorded log-probabilities; the GRPO ratio is then exactly 1.

Tiny preset with index_topk = 8, so rows longer than 8 tokens use sparse attention in both the
decode and the training forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig
from deepseek_jax.rl import grpo, rollout
from tests.test_generate import random_params

NEW = 10


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (5, 13)]
    params = random_params(cfg)
    ro = rollout.sample_groups(params, cfg, prompts, 3, NEW, temperature=1.0, top_k=20, seed=7,
                               eos_ids=(cfg.eos_token_id, 5, 6, 7))
    return cfg, params, prompts, ro


def test_groups_and_batch_layout(setup):
    cfg, _, prompts, ro = setup
    assert len(ro.generations) == 6 and ro.prompts == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({tuple(g.tokens) for g in ro.generations}) > 2  # samples differ
    assert ro.truncated == sum(len(g.tokens) == NEW and g.finish_reason == "length" for g in ro.generations)
    batch = rollout.build_batch(ro.trajectories(), cfg)
    b, s = batch.inputs.shape
    assert b == 6 and s % rollout.LENGTH_BUCKET == 0
    assert batch.kept_ids.shape == (b, s, 32)  # top-k 20, rounded up to a power of two
    assert batch.routes.shape == (cfg.num_moe_layers, b, s, cfg.num_experts_per_tok)
    for i, (p, g) in enumerate(zip(ro.prompts, ro.generations)):
        np.testing.assert_array_equal(batch.targets[i][batch.loss_mask[i]], g.tokens)
        np.testing.assert_array_equal(batch.old_logp[i][batch.loss_mask[i]], g.logprobs)
        assert np.flatnonzero(batch.loss_mask[i])[0] == len(p) - 1
        np.testing.assert_array_equal(batch.inputs[i, :len(p)], p)
        kept = batch.kept_ids[i][batch.loss_mask[i]]
        np.testing.assert_array_equal(kept[:, :20], g.kept_ids.reshape(-1, 20))
        assert (kept[:, 20:] == -1).all()
        off = ~batch.loss_mask[i] & (np.arange(s) < len(p) + len(g.tokens) - 1)  # prompt positions: target only
        np.testing.assert_array_equal(batch.kept_ids[i][off][:, 0], batch.targets[i][off])
        assert (batch.kept_ids[i][off][:, 1:] == -1).all()


def test_replayed_logprobs_match_sampler(setup):
    cfg, params, _, ro = setup
    batch = rollout.build_batch(ro.trajectories(), cfg)
    logp, entropy = rollout.policy_logprobs(params, cfg, batch, temperature=1.0)
    m = batch.loss_mask
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=1e-5)
    assert np.all(np.asarray(entropy)[m] <= np.log(20) + 1e-5)  # entropy over the 20 kept tokens
    # Without the sampling mask π_θ spreads over the whole vocabulary: log π is lower.
    unmasked = rollout.build_batch(ro.trajectories(), cfg, keep_sampling_mask=False)
    free, _ = rollout.policy_logprobs(params, cfg, unmasked, temperature=1.0)
    assert np.all(np.asarray(free)[m] < batch.old_logp[m] - 1e-4)

    adv = grpo.group_advantages(np.arange(6.0).reshape(2, 3)).reshape(-1)
    loss, metrics = grpo.grpo_loss(logp, jnp.asarray(batch.old_logp), logp, adv, jnp.asarray(m), kl_coef=0.1,
                                   offpolicy_delta=1e-3)
    np.testing.assert_allclose(metrics.ratio_mean, 1.0, atol=1e-5)
    # ratio 1, no KL, no sequence masked (drift ~1e-6 < δ): the loss is −mean(Â) = 0.
    assert abs(float(loss)) < 1e-4 and float(metrics.masked_fraction) == 0.0
    assert float(metrics.clip_fraction) == 0.0 and abs(float(metrics.kl)) < 1e-6


def test_grpo_gradient_through_policy(setup):
    """The loss is differentiable in params through the replayed forward, and its gradient is finite."""
    cfg, params, _, ro = setup
    batch = rollout.build_batch(ro.trajectories(), cfg)
    adv = grpo.group_advantages(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])).reshape(-1)

    def loss_fn(p):
        logp, entropy = rollout.policy_logprobs(p, cfg, batch, temperature=1.0)
        return grpo.grpo_loss(logp, jnp.asarray(batch.old_logp), None, adv, jnp.asarray(batch.loss_mask),
                              entropy=entropy)[0]

    grads = jax.grad(loss_fn)(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_errors(setup):
    cfg, params, prompts, ro = setup
    with pytest.raises(ValueError, match="group_size"):
        rollout.sample_groups(params, cfg, prompts, 0, 4)
    with pytest.raises(ValueError, match="temperature"):
        rollout.sample_groups(params, cfg, prompts, 2, 4, temperature=0.0)
    no_routes = rollout.Rollout(ro.prompts, [g.__class__(**{**g.__dict__, "routes": None}) for g in ro.generations], 3)
    with pytest.raises(ValueError, match="keep_routing"):
        rollout.build_batch(no_routes.trajectories(), cfg)
