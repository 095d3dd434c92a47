"""MTP speculative decoding: the first MTP layer drafts one token, the main model verifies it (spec §6).

At position i the MTP layer reads (h_i, token i+1) — h the main model's final-normed hidden
state — and predicts token i+2, so with the main model's next token x sampled at the last
position L-1 it drafts d for position L+1. One step appends [x, d] to the main cache (a T = 2
cached forward) and keeps d with speculative sampling (`sampling.speculative_accept`: tokens
are distributed exactly as without drafting; greedy keeps d iff it is the main model's
argmax). If d is kept, the main model's logits at d give a bonus token: two tokens per step.
The MTP layer then appends its rows for the two positions, (h_L, token L+1) and (h_{L+1},
token L+2), in its own cache group ("mtp", cache.py) and drafts the next token from the last
valid one; after a rejection the second row (and the main cache's) is stale and the lengths
(one array for all groups) advance by one only. Sequences marked inactive keep their length.

Only the first MTP layer drafts (V3.2 has one). Legend: B batch, T tokens, V vocab, D model dim.
"""

import functools

import jax
import jax.numpy as jnp

from deepseek_jax import sampling
from deepseek_jax.layers.mtp import MTP
from deepseek_jax.layers.rope import rope_cos_sin
from deepseek_jax.model import Transformer


def _keys(seq_keys, counts, n):
    """n keys per sequence [n, B] for the step that follows `counts` generated tokens."""
    return jnp.moveaxis(jax.vmap(lambda k, c: jax.random.split(jax.random.fold_in(k, c), n))(seq_keys, counts), 1, 0)


def _mtp_logits(params, cfg, hidden, next_tokens, cache, positions, start, mode):
    """The first MTP layer over (hidden [B,T,D], next_tokens [B,T]) at `positions`, reading and
    writing the "mtp" group of `cache`; -> (logits [B, T, V] float32, the updated group)."""
    cos, sin = rope_cos_sin(positions, cfg)
    embed = jnp.take(params["embed"], next_tokens, axis=0).astype(cfg.compute_dtype)
    _, normed, aux = MTP(cfg, mode).apply({"params": params["mtp_0"]}, hidden, embed, cos, sin,
                                          cache=(cache.layers["mtp"], 0), start=start)
    logits = jnp.einsum("BTD,DV->BTV", normed, params["lm_head"].astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    return logits, aux["cache"]


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "options"), donate_argnames=("cache",))
def speculative_prefill(params, cfg, tokens, lengths, cache, seq_keys, *, attention, options):
    """Prefill of right-padded prompts [B, T] (lengths [B]) into a cache with an "mtp" group.

    Returns (cache with lengths = lengths, first token Sample, draft [B], draft logits [B, V],
    main routes [L, B, T, K]). The MTP layer reads the prompt shifted by one, with the first
    sampled token at each prompt's end, so its rows 0..lengths-1 are all valid.
    """
    options = dict(options)
    logits, aux = Transformer(cfg).apply({"params": params}, tokens, attention=attention, with_mtp=False,
                                         cache=cache, prefill=True, return_routes=True, return_hidden=True,
                                         logits_at=(lengths - 1)[:, None])
    first_key, draft_key = _keys(seq_keys, jnp.zeros_like(lengths), 2)
    first = sampling.sample(logits[:, 0], first_key, **options)
    b, t = tokens.shape
    following = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[jnp.arange(b), lengths - 1].set(first.tokens)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mode = "dense" if attention == "dense" else "auto"
    mtp_logits, group = _mtp_logits(params, cfg, aux["hidden"], following, aux["cache"], positions, None, mode)
    cache = aux["cache"]._replace(layers={**aux["cache"].layers, "mtp": group}, lengths=lengths)
    draft_logits = jnp.take_along_axis(mtp_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    draft = sampling.sample(draft_logits, draft_key, **options).tokens
    return cache, first, draft, draft_logits, aux["routes"]


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "options"), donate_argnames=("cache",))
def speculative_step(params, cfg, cache, pending, draft, draft_logits, active, seq_keys, counts, *, attention,
                     options):
    """Verifies [pending, draft] (tokens [B] each) at cache.lengths.

    Returns (cache, token Sample for position L+1, bonus Sample for L+2 (valid where accepted),
    accepted [B] bool, next draft [B], its logits [B, V], main routes [L, B, 2, K]).
    `counts` [B] (tokens generated so far) picks the step's sampling keys.
    """
    options = dict(options)
    start = cache.lengths
    logits, aux = Transformer(cfg).apply({"params": params}, jnp.stack([pending, draft], axis=1), attention=attention,
                                         with_mtp=False, cache=cache, return_routes=True, return_hidden=True)
    accept_key, bonus_key, draft_key = _keys(seq_keys, counts, 3)
    token, accepted = sampling.speculative_accept(logits[:, 0], draft_logits, draft, accept_key, **options)
    bonus = sampling.sample(logits[:, 1], bonus_key, **options)

    positions = start[:, None] + jnp.arange(2, dtype=jnp.int32)
    mode = "dense" if attention == "dense" else "sparse"
    following = jnp.stack([token.tokens, bonus.tokens], axis=1)
    mtp_logits, group = _mtp_logits(params, cfg, aux["hidden"], following, aux["cache"], positions, start, mode)
    next_logits = jnp.take_along_axis(mtp_logits, accepted.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    next_draft = sampling.sample(next_logits, draft_key, **options).tokens
    lengths = jnp.where(active, start + 1 + accepted.astype(jnp.int32), start)
    cache = aux["cache"]._replace(layers={**aux["cache"].layers, "mtp": group}, lengths=lengths)
    return cache, token, bonus, accepted, next_draft, next_logits, aux["routes"]
