"""Autoregressive generation: prefill, then a jitted cached decode step, with sampling records (spec §2-§3, §8).

Prefill runs the model's forward over the right-padded prompts (attention as without a cache)
and fills the cache (cache.py); each decode step appends one token per sequence and attends in
absorbed mode over the indexer's top-k of its cache (`attention.cached_mla_attention`; while a
sequence holds at most index_topk keys the top-k keeps all of them, which equals dense). The
cache is donated to each step, so it is updated in place. Sequences of different lengths share
the batch: each writes and reads its own rows, up to its own length.

Per new token a generation records the sampler's log-probability, the Keep Sampling Mask
(sampling.py) and, optionally, the experts of every MoE layer for every input position (Keep
Routing): `routes` [L, P + N - 1, K] covers the prompt and every generated token but the last,
i.e. exactly the inputs whose logits produced the N new tokens; `forward(params,
prompt + tokens[:-1], cfg, routes=routes[:, None])` reproduces the sampler's logits.

With `speculative=True` the first MTP layer drafts a token and each step verifies it
(speculative.py): one or two tokens per step, the same greedy output, and an acceptance rate.

Sampling keys: sequence i draws its j-th token with fold_in(k_i, j), k_i = key(seed[i]) for a list
of per-prompt seeds, else fold_in(key(seed), i); with per-prompt seeds a sequence's samples do not
depend on the rest of the batch.

Legend: B batch, T prompt tokens (padded), S cache length, V vocab, L MoE layers, K experts per token.
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import sampling
from deepseek_jax.cache import init_cache
from deepseek_jax.model import Transformer
from deepseek_jax.speculative import speculative_prefill, speculative_step


@dataclasses.dataclass
class Generation:
    """The new tokens of one prompt and what was recorded while sampling them."""

    tokens: np.ndarray              # [N] int32, including the EOS / stop sequence that ended it
    logprobs: np.ndarray            # [N] float32, log-probability under the sampler's distribution
    finish_reason: str              # "eos", "stop" or "length"
    kept_counts: np.ndarray | None  # [N] int32 (None without top-p/top-k truncation)
    kept_ids: np.ndarray | None     # [sum(kept_counts)] int32: each step's kept ids, by decreasing probability
    routes: np.ndarray | None       # [L, P + N - 1, K] int32 experts per MoE layer (with record_routes)
    accept_rate: float | None = None  # speculative: fraction of MTP drafts the main model kept

    def kept_mask(self, vocab_size: int) -> np.ndarray:
        """The Keep Sampling Mask as booleans [N, V]."""
        if self.kept_counts is None:
            return np.ones((len(self.tokens), vocab_size), bool)
        return sampling.kept_mask(self.kept_ids, self.kept_counts, vocab_size)


class TokenEvent(NamedTuple):
    """One new token of sequence `index`, as the streaming form yields it."""

    index: int
    token: int
    logprob: float
    kept_ids: np.ndarray | None      # this step's kept ids (the mask), or None
    input_routes: np.ndarray | None  # [L, n, K] experts of the n inputs consumed to produce this token
    finish_reason: str | None        # set on the sequence's last token
    draft_accepted: bool | None = None  # speculative, first token of a step: was the step's draft kept


# --------------------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def prefill(params, cfg, tokens, lengths, cache, *, attention="auto"):
    """Fills an empty cache from right-padded prompts tokens [B, T] of lengths [B].

    Returns (logits [B, V] float32 at each prompt's last token, cache with lengths = lengths,
    routes [L, B, T, K]).
    """
    logits, aux = Transformer(cfg).apply({"params": params}, tokens, attention=attention, with_mtp=False,
                                         cache=cache, prefill=True, return_routes=True,
                                         logits_at=(lengths - 1)[:, None])
    return logits[:, 0], aux["cache"]._replace(lengths=lengths), aux["routes"]


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def decode_step(params, cfg, cache, tokens, *, attention="auto"):
    """Appends tokens [B] at cache.lengths -> (logits [B, V] float32, cache, routes [L, B, K]).

    attention "auto"/"sparse": the indexer's top-k of the cache; "dense": every cached row."""
    logits, aux = Transformer(cfg).apply({"params": params}, tokens[:, None], attention=attention, with_mtp=False,
                                         cache=cache, return_routes=True)
    return logits[:, 0], aux["cache"], aux["routes"][:, :, 0]


@functools.partial(jax.jit, static_argnames=("options",))
def _sample(logits, seq_keys, counts, options):
    keys = jax.vmap(jax.random.fold_in)(seq_keys, counts)
    return sampling.sample(logits, keys, **dict(options))


# --------------------------------------------------------------------------- host loop
PROMPT_BUCKET = 16  # padded prompt width: a multiple of this
CACHE_BUCKET = 64   # cache length: a multiple of this (a multiple of PROMPT_BUCKET, so prompts fit)


def _round_up(n, m):
    return -(-n // m) * m


def _sequence_keys(seed, n):
    """One PRNG key per sequence: key(seed[i]) for a list of seeds, else fold_in(key(seed), i)."""
    if isinstance(seed, int):
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    if len(seed) != n or not all(isinstance(s, int) for s in seed):
        raise ValueError(f"seed: expected an int or one int per prompt ({n}), got {seed!r}")
    return jax.vmap(jax.random.key)(jnp.asarray(seed, jnp.uint32))

def _check_prompts(prompts, cfg):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompts[{i}]: expected a non-empty list of ints, got {p!r:.80}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {cfg.vocab_size}), got {ids.min()}..{ids.max()}")


def _check_stop(stop):
    stop = [tuple(int(t) for t in s) for s in stop]
    if any(not s for s in stop):
        raise ValueError("stop: every stop sequence must hold at least one token id")
    return stop


class _Tracker:
    """Per-sequence stopping: EOS, stop sequences, max_new_tokens."""

    def __init__(self, n, max_new_tokens, eos_ids, stop):
        self.generated = [[] for _ in range(n)]
        self.finished = [None] * n
        self.max_new_tokens, self.eos_ids, self.stop = max_new_tokens, eos_ids, stop

    def add(self, i, token):
        out = self.generated[i]
        out.append(token)
        if token in self.eos_ids:
            self.finished[i] = "eos"
        elif any(len(out) >= len(s) and tuple(out[-len(s):]) == s for s in self.stop):
            self.finished[i] = "stop"
        elif len(out) >= self.max_new_tokens:
            self.finished[i] = "length"
        return self.finished[i]

    def active(self):
        return [i for i, f in enumerate(self.finished) if f is None]


def _host_kept(sample):
    """Host copies of the kept ids, fetching only as many columns as the largest kept set needs."""
    if sample.kept_ids is None:
        return None, None
    counts = np.asarray(sample.kept_counts)
    width = min(sample.kept_ids.shape[1], 1 << int(counts.max() - 1).bit_length())  # power-of-two buckets
    return np.asarray(sample.kept_ids[:, :width]), counts


def _events(tracker, sample, indices, routes, accepted=None):
    """TokenEvents of a device Sample for the sequences in `indices`, updating the tracker.
    routes: per-sequence input routes (or None); accepted: per-sequence draft verdicts (or None)."""
    tokens, logprobs = np.asarray(sample.tokens), np.asarray(sample.logprobs)
    kept_ids, kept_counts = _host_kept(sample)
    for i in indices:
        token = int(tokens[i])
        yield TokenEvent(i, token, float(logprobs[i]), None if kept_ids is None else kept_ids[i, :kept_counts[i]],
                         None if routes is None else routes[i], tracker.add(i, token),
                         None if accepted is None else bool(accepted[i]))


def _per_sequence_routes(routes, n, lengths=None):
    """Host routes [L, B, T, K] -> per sequence [L, T_i, K] (T_i = lengths[i], default T)."""
    routes = np.asarray(routes)
    return [routes[:, i, :None if lengths is None else lengths[i]] for i in range(n)]


def stream(params, cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0, stop: Sequence[Sequence[int]] = (),
           eos_ids: Sequence[int] | None = None, record_routes: bool = False, attention: str = "auto",
           speculative: bool = False) -> Iterator[TokenEvent]:
    """Streaming form of `generate`: yields a TokenEvent per new token as soon as it is sampled
    (all sequences advance together, one token per step, or one or two with `speculative`;
    finished ones stop yielding)."""
    _check_prompts(prompts, cfg)
    sampling.check_options(cfg.vocab_size, temperature, top_p, top_k)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if speculative and not cfg.num_nextn_predict_layers:
        raise ValueError("speculative: needs an MTP layer, but cfg.num_nextn_predict_layers is 0")
    stop = _check_stop(stop)
    lengths = np.array([len(p) for p in prompts], np.int32)
    n, longest = len(prompts), int(lengths.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"longest prompt + max_new_tokens = {longest + max_new_tokens} exceeds "
                         f"cfg.max_position_embeddings ({cfg.max_position_embeddings})")
    # Shapes in buckets, so calls with nearby lengths share compiled steps. A speculative step
    # writes two rows past the last token it keeps.
    width = _round_up(longest, PROMPT_BUCKET)
    max_len = _round_up(longest + max_new_tokens + (2 if speculative else 0), CACHE_BUCKET)
    tokens = np.zeros((n, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    options = (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
    seq_keys = _sequence_keys(seed, n)
    eos_ids = {cfg.eos_token_id} if eos_ids is None else {int(t) for t in eos_ids}
    tracker = _Tracker(n, max_new_tokens, eos_ids, stop)
    counts = lambda: jnp.asarray([len(g) for g in tracker.generated], jnp.int32)

    cache = init_cache(cfg, n, max_len, mtp=speculative)
    if not speculative:
        logits, cache, routes = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                        attention=attention)
        sample = _sample(logits, seq_keys, counts(), options)
        yield from _events(tracker, sample, tracker.active(),
                           _per_sequence_routes(routes, n, lengths) if record_routes else None)
        while tracker.active():
            logits, cache, routes = decode_step(params, cfg, cache, sample.tokens, attention=attention)
            sample = _sample(logits, seq_keys, counts(), options)
            yield from _events(tracker, sample, tracker.active(),
                               _per_sequence_routes(routes[:, :, None], n) if record_routes else None)
        return

    static = {"attention": attention, "options": options}
    cache, sample, draft, draft_logits, routes = speculative_prefill(
        params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), cache, seq_keys, **static)
    yield from _events(tracker, sample, tracker.active(),
                       _per_sequence_routes(routes, n, lengths) if record_routes else None)
    pending = sample.tokens
    while tracker.active():
        active = tracker.active()
        cache, sample, bonus, accepted, draft, draft_logits, routes = speculative_step(
            params, cfg, cache, pending, draft, draft_logits, jnp.asarray([f is None for f in tracker.finished]),
            seq_keys, counts(), **static)
        step_routes = _per_sequence_routes(routes, n) if record_routes else None
        first = None if step_routes is None else [r[:, :1] for r in step_routes]
        host_accepted = np.asarray(accepted)
        yield from _events(tracker, sample, active, first, host_accepted)
        second = None if step_routes is None else [r[:, 1:] for r in step_routes]
        yield from _events(tracker, bonus, [i for i in tracker.active() if host_accepted[i]], second)
        pending = jnp.where(accepted, bonus.tokens, sample.tokens)


def generate(params, cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0, stop: Sequence[Sequence[int]] = (),
             eos_ids: Sequence[int] | None = None, record_routes: bool = False, attention: str = "auto",
             speculative: bool = False) -> list[Generation]:
    """Continues each prompt (a list of token ids) by up to max_new_tokens tokens.

    temperature 0 is greedy; top_p / top_k truncate (sampling.py). A sequence ends at one of
    `eos_ids` (None: cfg.eos_token_id; () for none), when its new tokens end with one of `stop`
    (token-id sequences), or after max_new_tokens. record_routes keeps the MoE experts (Keep Routing).
    attention: "auto" (sparse decode) or "dense" (decode over every cached row). speculative:
    MTP drafts and the main model verifies (speculative.py); greedy output is unchanged, sampled
    output has the same distribution (other draws), and Generation.accept_rate reports the
    fraction of drafts kept. Returns one Generation per prompt, in order.
    """
    n = len(prompts) if isinstance(prompts, (list, tuple)) else 0
    tokens, logprobs, kept, counts, routes, reasons, verdicts = ([[] for _ in range(n)] for _ in range(7))
    for ev in stream(params, cfg, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     seed=seed, stop=stop, eos_ids=eos_ids, record_routes=record_routes, attention=attention,
                     speculative=speculative):
        tokens[ev.index].append(ev.token)
        logprobs[ev.index].append(ev.logprob)
        if ev.kept_ids is not None:
            kept[ev.index].append(ev.kept_ids)
            counts[ev.index].append(len(ev.kept_ids))
        if ev.input_routes is not None:
            routes[ev.index].append(ev.input_routes)
        if ev.finish_reason is not None:
            reasons[ev.index] = ev.finish_reason
        if ev.draft_accepted is not None:
            verdicts[ev.index].append(ev.draft_accepted)
    truncated = sampling.truncates(top_p, top_k)
    return [Generation(
        tokens=np.asarray(tokens[i], np.int32), logprobs=np.asarray(logprobs[i], np.float32),
        finish_reason=reasons[i],
        kept_counts=np.asarray(counts[i], np.int32) if truncated else None,
        kept_ids=np.concatenate(kept[i]).astype(np.int32) if truncated else None,
        routes=np.concatenate(routes[i], axis=1) if record_routes else None,
        accept_rate=float(np.mean(verdicts[i])) if speculative and verdicts[i] else None) for i in range(n)]
