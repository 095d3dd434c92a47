"""GRPO optimizer steps (spec §8) on a rollout batch: a positive-advantage completion becomes
more likely and a negative one less likely; several steps on one batch move π_θ away from π_old
(ratio ≠ 1, clipping acts) and the KL to the frozen reference grows from 0."""

import numpy as np
import optax
import pytest

from deepseek_jax import ModelConfig
from deepseek_jax.rl import grpo, rollout
from deepseek_jax.rl.update import GRPOOptions, grpo_step, reference_logprobs
from tests.test_generate import random_params


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.preset("tiny")
    params = random_params(cfg, std=0.05)
    prompts = [[0, 40, 41, 42], [0, 50, 51]]
    ro = rollout.sample_groups(params, cfg, prompts, 4, 4, temperature=1.0, top_k=32, seed=3, eos_ids=())
    return cfg, params, ro


def test_steps_follow_the_advantage(setup):
    cfg, params, ro = setup
    batch = rollout.build_batch(ro.trajectories(), cfg)
    rewards = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    adv = np.asarray(grpo.group_advantages(rewards)).reshape(-1)
    ref = reference_logprobs(params, cfg, batch)
    np.testing.assert_allclose(np.asarray(ref)[batch.loss_mask], batch.old_logp[batch.loss_mask], atol=1e-5)
    optimizer = optax.sgd(0.5)
    opt_state = optimizer.init(params)
    options = GRPOOptions(kl_coef=0.01, offpolicy_delta=0.5)
    p = params
    for i in range(4):
        p, opt_state, loss, m, gnorm = grpo_step(p, opt_state, batch, ref, adv, cfg=cfg, optimizer=optimizer,
                                                 options=options)
        assert np.isfinite(float(loss)) and float(gnorm) > 0
        if i == 0:
            assert float(m.clip_fraction) == 0.0 and abs(float(m.kl)) < 1e-6
    logp, _ = rollout.policy_logprobs(p, cfg, batch)
    seq = np.asarray(grpo.sequence_mean(logp - batch.old_logp, batch.loss_mask))
    assert seq[0] > 0 and seq[7] > 0                  # rewarded completions more likely
    assert seq[[1, 2, 3, 4, 5, 6]].mean() < 0         # the others, on average, less likely
    assert float(np.sum(adv * seq)) > 0               # the advantage-weighted log-likelihood rose
    assert float(m.kl) > 0 and abs(float(m.ratio_mean) - 1) > 1e-4
