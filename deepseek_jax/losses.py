"""Training losses (spec §4-§6): next-token cross-entropy, MTP, MoE sequence-wise balance, indexer KL.

Every loss is float32 and averages over real tokens (mask > 0) only.

Legend: B batch, T positions, V vocab, H heads, S keys (all causal keys, or the selected set),
L MoE layers.
"""

import jax
import jax.numpy as jnp

# A finite stand-in for -inf: masked logits stay finite, so 0 · log q is 0 and never NaN.
_MASKED = -1e30


def token_nll(logits, targets):
    """Per-token negative log-likelihood [B, T] of targets [B, T] under logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def lm_loss(logits, targets, mask):
    """Next-token cross-entropy averaged over real tokens: logits [B,T,V] f32, targets/mask [B,T]."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_loss(mtp_logits, targets, mask, weight):
    """L_MTP = (λ/D) Σ_k CE_k (spec §6). mtp_logits [D, B, T, V]; position i at depth k predicts
    token i + k + 1 = targets[i + k]; positions whose target lies past the sequence are dropped."""
    depth, _, t, _ = mtp_logits.shape
    if depth >= t:
        raise ValueError(f"mtp_loss: MTP depth {depth} leaves no positions in a sequence of {t} tokens")
    ces = [lm_loss(mtp_logits[k - 1, :, : t - k], targets[:, k:], mask[:, k:]) for k in range(1, depth + 1)]
    return weight / depth * sum(ces)


def balance_loss(balance, alpha):
    """L_Bal = α Σ_i f_i P_i per MoE layer (spec §5), summed over layers; balance [L] from the model."""
    return alpha * jnp.sum(balance)


def head_summed_probs(logits, valid):
    """The indexer's target (spec §4): per-head softmax over the valid keys, summed over heads,
    L1-normalised. logits [..., H, S] float32, valid [..., S] bool -> [..., S]."""
    logits = jnp.where(valid[..., None, :], logits.astype(jnp.float32), _MASKED)
    summed = jnp.sum(jax.nn.softmax(logits, axis=-1) * valid[..., None, :], axis=-2)
    return summed / jnp.maximum(jnp.sum(summed, axis=-1, keepdims=True), 1e-30)


def indexer_kl(target, scores, valid):
    """KL(target ‖ softmax(scores)) per query row over the valid keys: target, scores [..., S]
    float32 (target sums to 1 over valid keys), valid [..., S] bool -> [...]."""
    log_q = jax.nn.log_softmax(jnp.where(valid, scores.astype(jnp.float32), _MASKED), axis=-1)
    log_p = jnp.log(jnp.where(target > 0, target, 1.0))
    return jnp.sum(jnp.where(valid & (target > 0), target * (log_p - log_q), 0.0), axis=-1)
