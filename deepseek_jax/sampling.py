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


def sample(logits, keys, *, temperature: float, top_p: float = 1.0, top_k: int = 0) -> Sample:
    """logits [B, V] float32, keys [B] (one PRNG key per sequence; unused when greedy)."""
    scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    draw = jax.vmap(jax.random.categorical)
    if not truncates(top_p, top_k):
        tokens = jnp.argmax(scaled, -1) if temperature == 0 else draw(keys, scaled)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled), tokens[:, None], -1)[:, 0]
        return Sample(tokens.astype(jnp.int32), logprobs, None, None)

    values, ids = jax.lax.top_k(scaled, top_k or scaled.shape[-1])  # [B, M], decreasing
    probs = jax.nn.softmax(values, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before a token < top_p: a prefix
    if top_p >= 1:  # the cumulative sum can round to 1 before the tail; top_p = 1 keeps every candidate
        keep = jnp.ones_like(keep)
    keep = keep.at[:, 0].set(True)
    masked = jnp.where(keep, values, -jnp.inf)
    pick = jnp.zeros(ids.shape[:1], jnp.int32) if temperature == 0 else draw(keys, masked)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(masked), pick[:, None], -1)[:, 0]
    tokens = jnp.take_along_axis(ids, pick[:, None], -1)[:, 0]
    return Sample(tokens.astype(jnp.int32), logprobs, ids.astype(jnp.int32), keep.sum(-1).astype(jnp.int32))


def kept_mask(kept_ids, kept_counts, vocab_size: int) -> np.ndarray:
    """Expands recorded masks to booleans [N, V]: kept_ids is the concatenation, step after step,
    of each step's kept prefix (as `Generation.kept_ids`), kept_counts [N] their lengths."""
    kept_counts = np.asarray(kept_counts)
    mask = np.zeros((len(kept_counts), vocab_size), bool)
    rows = np.repeat(np.arange(len(kept_counts)), kept_counts)
    mask[rows, np.asarray(kept_ids)] = True
    return mask
