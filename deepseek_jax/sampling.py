"""Next-token sampling with temperature, top-k and top-p that records what RL needs (spec §8).

The sampler's distribution π. Logits are divided by τ = temperature (τ = 1 when greedy,
temperature 0). Top-k keeps the k largest; top-p then keeps the shortest prefix of the rest,
sorted by probability (renormalised after top-k), whose cumulative probability reaches top_p
(at least one token). Order among equal logits: lowest token id first (`lax.top_k`). π is
softmax(logits / τ) renormalised over the kept set. temperature > 0 draws from π (Gumbel-max,
`jax.random.categorical`); temperature 0 takes its mode, the argmax of the logits. The recorded
log-probability is log π(token) (with no truncation and temperature 0: the model's own
log-softmax at the argmax).

Keep Sampling Mask. The kept set is a prefix of the tokens sorted by probability, so a step's
mask is stored as `kept_ids` [M] (token ids in that order; M = top_k, or the vocabulary size
when only top-p truncates) and `kept_count` (the prefix length): the kept tokens are
kept_ids[:kept_count]. A trainer applies it to π_θ by renormalising softmax(logits / τ) over
those ids. Without truncation (top_k 0, top_p 1) every token is kept and no mask is recorded.

Legend: B batch, V vocab, M candidate tokens (top_k or V).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sample(NamedTuple):
    tokens: jax.Array               # [B] int32
    logprobs: jax.Array             # [B] float32, log π(token)
    kept_ids: jax.Array | None      # [B, M] int32, token ids by decreasing probability
    kept_counts: jax.Array | None   # [B] int32, kept prefix length of kept_ids


def check_options(vocab_size: int, temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k: expected an int in [0, vocab_size={vocab_size}] (0 = off), got {top_k!r}")


def truncates(top_p: float, top_k: int) -> bool:
    return top_k > 0 or top_p < 1


def _truncate(logits, temperature, top_p, top_k):
    """(logits / τ over the candidates with -inf outside the kept set [B, M], candidate ids
    [B, M] by decreasing probability or None for the whole vocabulary in order, kept counts [B]
    or None)."""
    scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    if not truncates(top_p, top_k):
        return scaled, None, None
    values, ids = jax.lax.top_k(scaled, top_k or scaled.shape[-1])  # [B, M], decreasing
    probs = jax.nn.softmax(values, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before a token < top_p: a prefix
    if top_p >= 1:  # the cumulative sum can round to 1 before the tail; top_p = 1 keeps every candidate
        keep = jnp.ones_like(keep)
    keep = keep.at[:, 0].set(True)
    return jnp.where(keep, values, -jnp.inf), ids.astype(jnp.int32), keep.sum(-1).astype(jnp.int32)


def sample(logits, keys, *, temperature: float, top_p: float = 1.0, top_k: int = 0) -> Sample:
    """logits [B, V] float32, keys [B] (one PRNG key per sequence; unused when greedy)."""
    masked, ids, counts = _truncate(logits, temperature, top_p, top_k)
    # Greedy: the first maximum, i.e. the lowest id among equal logits (candidates are in that order).
    pick = jnp.argmax(masked, -1) if temperature == 0 else jax.vmap(jax.random.categorical)(keys, masked)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(masked), pick[:, None], -1)[:, 0]
    tokens = pick if ids is None else jnp.take_along_axis(ids, pick[:, None], -1)[:, 0]
    return Sample(tokens.astype(jnp.int32), logprobs, ids, counts)


def _scatter_to_vocab(logp, ids, vocab_size):
    if ids is None:
        return logp
    rows = jnp.arange(logp.shape[0])[:, None]
    return jnp.full((logp.shape[0], vocab_size), -jnp.inf, jnp.float32).at[rows, ids].set(logp)


def log_policy(logits, *, temperature: float, top_p: float = 1.0, top_k: int = 0):
    """log π over the whole vocabulary [B, V] (-inf outside the kept set)."""
    masked, ids, _ = _truncate(logits, temperature, top_p, top_k)
    return _scatter_to_vocab(jax.nn.log_softmax(masked), ids, logits.shape[-1])


def speculative_accept(target_logits, draft_logits, drafts, keys, *, temperature: float, top_p: float = 1.0,
                       top_k: int = 0):
    """Speculative sampling of one position: the draft d ~ q is kept with probability
    min(1, p(d) / q(d)), else a token is drawn from max(p - q, 0) renormalised; the result is
    distributed as p (π of target_logits), whatever q (π of draft_logits) is. Greedy
    (temperature 0): d is kept iff it is p's mode, else the mode replaces it.

    Returns (Sample of the token under p: log p, p's kept ids / counts; accepted [B] bool).
    """
    masked, ids, counts = _truncate(target_logits, temperature, top_p, top_k)
    log_p = _scatter_to_vocab(jax.nn.log_softmax(masked), ids, target_logits.shape[-1])
    if temperature == 0:
        tokens = jnp.argmax(log_p, -1)  # the mode; the lowest id among equal logits
        accepted = drafts == tokens
    else:
        log_q = log_policy(draft_logits, temperature=temperature, top_p=top_p, top_k=top_k)
        at = lambda a: jnp.take_along_axis(a, drafts[:, None], -1)[:, 0]
        accept_key, residual_key = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        u = jax.vmap(jax.random.uniform)(accept_key)
        accepted = jnp.log(u) < at(log_p) - at(log_q)
        residual = jnp.maximum(jnp.exp(log_p) - jnp.exp(log_q), 0.0)
        # p == q leaves no residual, but then the draft is always accepted; fall back to p.
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, jnp.log(residual), log_p)
        tokens = jnp.where(accepted, drafts, jax.vmap(jax.random.categorical)(residual_key, residual))
    logprobs = jnp.take_along_axis(log_p, tokens[:, None], -1)[:, 0]
    return Sample(tokens.astype(jnp.int32), logprobs, ids, counts), accepted


def kept_mask(kept_ids, kept_counts, vocab_size: int) -> np.ndarray:
    """Expands recorded masks to booleans [N, V]: kept_ids is the concatenation, step after step,
    of each step's kept prefix (as `Generation.kept_ids`), kept_counts [N] their lengths."""
    kept_counts = np.asarray(kept_counts)
    mask = np.zeros((len(kept_counts), vocab_size), bool)
    rows = np.repeat(np.arange(len(kept_counts)), kept_counts)
    mask[rows, np.asarray(kept_ids)] = True
    return mask
