"""One GRPO optimizer step on a rollout batch (spec §8), jitted.

π_old is the rollout (its recorded log-probabilities in the batch), so several steps on one
batch make the ratio π_θ/π_old move away from 1 and the clip and the off-policy mask act.
log π_ref is computed once per batch by `reference_logprobs` (a frozen copy of the initial
params, same routes and kept sets).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.rl import grpo
from deepseek_jax.rl.rollout import Batch, policy_logprobs


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    kl_estimator: str = "unbiased"
    offpolicy_delta: float | None = None


def _device_batch(batch: Batch) -> Batch:
    return Batch(*(None if x is None else jnp.asarray(x) for x in batch))


@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _reference(ref_params, cfg, batch, temperature):
    return policy_logprobs(ref_params, cfg, batch, temperature=temperature)[0]


def reference_logprobs(ref_params, cfg, batch: Batch, *, temperature: float = 1.0):
    """log π_ref(target) [B, S] on the batch (Keep Routing and Keep Sampling Mask as for π_θ)."""
    return _reference(ref_params, cfg, _device_batch(batch), temperature)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "options"))
def _step(params, opt_state, batch, ref_logp, advantages, cfg, optimizer, options):
    def loss_fn(p):
        logp, entropy = policy_logprobs(p, cfg, batch, temperature=options.temperature)
        return grpo.grpo_loss(logp, batch.old_logp, ref_logp, advantages, batch.loss_mask,
                              clip_low=options.clip_low, clip_high=options.clip_high, kl_coef=options.kl_coef,
                              kl_estimator=options.kl_estimator, offpolicy_delta=options.offpolicy_delta,
                              entropy=entropy)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    grad_norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree_util.tree_leaves(grads)))
    return optax.apply_updates(params, updates), opt_state, loss, metrics, grad_norm


def grpo_step(params, opt_state, batch: Batch, ref_logp, advantages, *, cfg, optimizer: optax.GradientTransformation,
              options: GRPOOptions):
    """-> (params, opt_state, loss, GRPOMetrics, grad_norm). advantages [B] (prompt-major)."""
    return _step(params, opt_state, _device_batch(batch), ref_logp, jnp.asarray(advantages, jnp.float32), cfg,
                 optimizer, options)
