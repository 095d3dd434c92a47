"""GRPO objective with the DeepSeek-V3.2 changes (spec §8), one small pure function per term.

For a prompt, G completions o_i are sampled from π_old (the inference engine) and scored R_i.
The objective maximised is

    J = (1/G) Σ_i (1/|o_i|) Σ_t [ min(r Â_i, clip(r, 1 − ε_low, 1 + ε_high) Â_i) · M_i − β · KL_t ]

with r = π_θ(o_t) / π_old(o_t), Â_i = R_i − mean_G(R) (no std division by default), M_i the
off-policy sequence mask and KL_t a per-token estimate of KL(π_θ ‖ π_ref). Keep Sampling Mask:
every log π (θ and ref) is renormalised over the token set the sampler's top-p/top-k kept at
that step (`token_logprobs`, from the kept ids). Keep Routing lives in the forward pass (rollout.py).

Batches are flat: B = prompts × G sequences, in prompt-major order (the G samples of a prompt
are consecutive); T completion positions, with `mask` [B, T] marking real completion tokens.

Legend: P prompts, G samples per prompt, B = P·G sequences, T completion positions, V vocab.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("unbiased", "k3", "k1")


def group_advantages(rewards, *, normalize_std: bool = False, eps: float = 1e-6):
    """Â_i = R_i − mean_G(R) per prompt (spec §8: no division by the std); with normalize_std
    the classic GRPO (R_i − mean) / (std + eps). rewards [P, G] -> advantages [P, G]."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards: expected [prompts, group_size], got shape {rewards.shape}")
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if normalize_std:
        centred = centred / (rewards.std(axis=1, keepdims=True) + eps)
    return centred


def sequence_mean(x, mask):
    """(1/|o_i|) Σ_t x_t over the real tokens of each sequence: x, mask [B, T] -> [B]
    (0 for an empty sequence)."""
    mask = mask.astype(jnp.float32)
    return (x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


def clipped_surrogate(logp, old_logp, advantages, *, clip_low: float, clip_high: float):
    """Per-token PPO term min(r Â, clip(r, 1 − ε_low, 1 + ε_high) Â), r = exp(log π_θ − log π_old)
    (spec §8). logp, old_logp [B, T], advantages [B]. Returns (objective [B, T], clipped [B, T]
    bool: the clipped branch is the smaller one, so no gradient flows through r there)."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def kl_estimate(logp, ref_logp, old_logp, estimator: str = "unbiased"):
    """Per-token estimate of KL(π_θ ‖ π_ref) from a token sampled by π_old (spec §8) [B, T].

    "unbiased": (π_θ/π_old) · (π_ref/π_θ − log(π_ref/π_θ) − 1), gradients through both factors;
        its expectation under π_old is exactly KL(π_θ ‖ π_ref), so its gradient is unbiased.
    "k3": π_ref/π_θ − log(π_ref/π_θ) − 1 (unbiased value only on-policy; its gradient estimates
        the reverse KL's and is unbounded when π_θ ≪ π_ref).
    "k1": log π_θ − log π_ref.
    """
    log_ratio = ref_logp - logp  # log(π_ref / π_θ)
    if estimator == "k1":
        return -log_ratio
    k3 = jnp.exp(log_ratio) - log_ratio - 1.0
    if estimator == "k3":
        return k3
    if estimator == "unbiased":
        return jnp.exp(logp - old_logp) * k3
    raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")


def offpolicy_mask(advantages, logp, old_logp, mask, delta: float | None):
    """M_i (spec §8): 0 when Â_i < 0 and (1/|o_i|) Σ_t log(π_old/π_θ) > δ, else 1. π_old is the
    sampler's recorded log-probability. No gradient. delta None: no masking. -> [B] float32."""
    if delta is None:
        return jnp.ones(advantages.shape, jnp.float32)
    drift = sequence_mean(jax.lax.stop_gradient(old_logp - logp), mask)
    return jnp.where((advantages < 0) & (drift > delta), 0.0, 1.0)


def token_logprobs(logits, tokens, kept_ids=None, *, temperature: float = 1.0):
    """log π(token) and the entropy of π at each position, π = softmax(logits / τ) renormalised
    over the sampler's kept set (Keep Sampling Mask, spec §8; as sampling.py defines π).

    logits [B, T, V], tokens [B, T], kept_ids [B, T, M] int32 or None (every token kept): the
    ids the sampler's top-p/top-k kept at each position, padded with -1. Storing ids instead of
    a [B, T, V] mask keeps the batch O(M) per position for a large vocabulary, and the result is
    the same: π is renormalised over the gathered logits. Every position needs at least one id
    (off the loss mask a batch puts its target there). Returns (logp [B, T], entropy [B, T]) float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: training needs the sampler's τ > 0, got {temperature}")
    scaled = logits.astype(jnp.float32) / temperature
    if kept_ids is None:
        logp_all = jax.nn.log_softmax(scaled, axis=-1)
        logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
        return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    if kept_ids.shape[:-1] != tokens.shape:
        raise ValueError(f"kept_ids: expected shape {tokens.shape} + [M] (as tokens), got {kept_ids.shape}")
    valid = kept_ids >= 0
    gathered = jnp.take_along_axis(scaled, jnp.maximum(kept_ids, 0), axis=-1)        # [B, T, M]
    log_norm = jax.nn.logsumexp(jnp.where(valid, gathered, -jnp.inf), axis=-1)       # [B, T]
    logp = jnp.take_along_axis(scaled, tokens[..., None], axis=-1)[..., 0] - log_norm
    # Padding slots hold 0 (not -inf) before the product, so the entropy's gradient stays finite.
    logq = jnp.where(valid, gathered - log_norm[..., None], 0.0)
    entropy = -jnp.sum(jnp.where(valid, jnp.exp(logq), 0.0) * logq, axis=-1)
    return logp, entropy


class GRPOMetrics(NamedTuple):
    clip_fraction: jax.Array    # fraction of real tokens whose clipped branch was taken
    masked_fraction: jax.Array  # fraction of sequences dropped by the off-policy mask
    kl: jax.Array               # mean per-token KL estimate (the configured estimator)
    entropy: jax.Array          # mean per-token entropy of π_θ (nan when not given)
    ratio_mean: jax.Array       # mean per-token π_θ/π_old


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
              kl_coef: float = 0.0, kl_estimator: str = "unbiased", offpolicy_delta: float | None = None,
              entropy=None):
    """−J (spec §8): per sequence the mean over its tokens of surrogate · M_i − β · KL, then the
    mean over all sequences (= over each group's G, then over prompts, as groups are equal-sized).

    logp [B, T] log π_θ (differentiable); old_logp [B, T] the sampler's log π_old; ref_logp [B, T]
    log π_ref (None: no KL; with kl_coef 0 only the metric); advantages [B]; mask [B, T] real completion tokens;
    entropy [B, T] optional, for the metric. Returns (loss scalar, GRPOMetrics).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp/old_logp/mask: expected equal shapes, got {logp.shape}, {old_logp.shape}, "
                         f"{mask.shape}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected shape {logp.shape[:1]} (one per sequence), got {advantages.shape}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef and ref_logp is None:
        raise ValueError(f"ref_logp: needed for kl_coef = {kl_coef}, got None")
    old_logp = jax.lax.stop_gradient(old_logp)
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high)
    keep = offpolicy_mask(advantages, logp, old_logp, mask, offpolicy_delta)
    per_token = surrogate * keep[:, None]
    kl = jnp.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_estimate(logp, jax.lax.stop_gradient(ref_logp), old_logp, kl_estimator)
    if kl_coef:
        per_token = per_token - kl_coef * kl
    loss = -jnp.mean(sequence_mean(per_token, mask))

    maskf = mask.astype(jnp.float32)
    n_tokens = jnp.maximum(maskf.sum(), 1.0)
    token_mean = lambda x: jnp.sum(jax.lax.stop_gradient(x) * maskf) / n_tokens
    metrics = GRPOMetrics(
        clip_fraction=token_mean(clipped.astype(jnp.float32)),
        masked_fraction=1.0 - keep.mean(),
        kl=token_mean(kl),
        entropy=jnp.asarray(jnp.nan) if entropy is None else token_mean(entropy),
        ratio_mean=token_mean(jnp.exp(logp - old_logp)))
    return loss, metrics
