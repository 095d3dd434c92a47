"""GRPO rollouts and the training-side log-probabilities (spec §8).

`sample_groups` draws G completions per prompt through `generate` (one seed per sample, expert
routes recorded for Keep Routing, the sampler's kept sets for Keep Sampling Mask), in
prompt-major order. A `Trajectory` is one training row: its tokens (prompt, then one or more
generated turns with the observations between them, multiturn.py) and the generations of its
turns. `build_batch` lays trajectories out for training: row i holds the tokens minus the last
(the inputs whose logits produced the generated tokens), `targets` the next tokens, `loss_mask`
the generated positions only (prompts and observations carry no loss), `old_logp` the
sampler's log π_old there, `kept_ids` its kept sets and `routes` its experts. `policy_logprobs`
runs the training forward with those routes (Keep Routing) and renormalises over the kept sets;
with unchanged params it reproduces the sampler's log-probabilities.

Legend: B sequences (prompts × G), S padded input length, V vocab, M kept ids per position,
L MoE layers, K experts per token.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from deepseek_jax.generate import Generation, generate
from deepseek_jax.model import forward
from deepseek_jax.rl.grpo import token_logprobs

LENGTH_BUCKET = 16  # padded input length: a multiple of this (coarser for long rows), so batches share compiled steps


class Trajectory(NamedTuple):
    tokens: np.ndarray                           # [N] int32: the whole row
    turns: tuple[tuple[int, Generation], ...]    # (index in tokens of the turn's first generated token, its Generation)


@dataclasses.dataclass
class Rollout:
    prompts: list[list[int]]        # [B] prompt token ids, each prompt repeated G times
    generations: list[Generation]   # [B] prompt-major: the G samples of prompt p are rows p·G .. p·G + G − 1
    group_size: int

    @property
    def truncated(self) -> int:
        """Completions cut by max_new_tokens (finish_reason "length")."""
        return sum(g.finish_reason == "length" for g in self.generations)

    def trajectories(self) -> list[Trajectory]:
        """One single-turn row per sample: prompt + completion."""
        return [Trajectory(np.concatenate([np.asarray(p, np.int32), g.tokens]), ((len(p), g),))
                for p, g in zip(self.prompts, self.generations)]


class Batch(NamedTuple):
    inputs: np.ndarray            # [B, S] int32: the row's tokens but the last, right-padded with 0
    targets: np.ndarray           # [B, S] int32: the token each input position predicts
    loss_mask: np.ndarray         # [B, S] bool: positions whose target is a generated token
    old_logp: np.ndarray          # [B, S] float32: the sampler's log π_old(target) (0 off the mask)
    kept_ids: np.ndarray | None   # [B, S, M] int32: the sampler's kept ids, -1 padded (off the mask: the
                                  # target alone); None: the sampler did not truncate
    routes: np.ndarray | None     # [L, B, S, K] int32: the sampler's experts (padding rows: experts 0..K-1)


def sample_groups(params, cfg, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int, *,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  eos_ids: Sequence[int] | None = None, stop: Sequence[Sequence[int]] = (),
                  record_routes: bool = True) -> Rollout:
    """G = group_size samples of each prompt, in one batched `generate` call. Sample j of the
    whole batch uses the seed seed·B + j (B = len(prompts)·G), so calls with different `seed`
    draw independent samples and each sample does not depend on the rest of the batch."""
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    if temperature <= 0 and group_size > 1:
        raise ValueError(f"temperature: GRPO needs diverse samples (> 0) for group_size {group_size}, "
                         f"got {temperature}")
    repeated = [list(p) for p in prompts for _ in range(group_size)]
    seeds = [seed * len(repeated) + j for j in range(len(repeated))]
    gens = generate(params, cfg, repeated, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seeds, stop=stop, eos_ids=eos_ids, record_routes=record_routes)
    return Rollout(repeated, gens, group_size)


def padded_length(n: int) -> int:
    """A multiple of LENGTH_BUCKET, and of 2^(⌊log2 n⌋ − 3) for long rows: ~8 widths per doubling."""
    step = max(LENGTH_BUCKET, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def _kept_width(trajectories) -> int:
    """Kept ids per position: the largest kept set, rounded up to a power of two."""
    most = max(int(g.kept_counts.max()) for t in trajectories for _, g in t.turns)
    return 1 << (most - 1).bit_length()


def build_batch(trajectories: Sequence[Trajectory], cfg, *, keep_sampling_mask: bool = True,
                keep_routing: bool = True) -> Batch:
    """The training batch of trajectories (see the module docstring). Keep Routing replays the
    last turn's routes: its prefill recomputed every earlier position with the same params."""
    for i, t in enumerate(trajectories):
        if not t.turns:
            raise ValueError(f"trajectories[{i}]: no generated turn to train on")
        previous_end = 1
        for start, g in t.turns:
            if start < previous_end or not np.array_equal(t.tokens[start:start + len(g.tokens)], g.tokens):
                raise ValueError(f"trajectories[{i}]: the turn at {start} is not the generation's tokens in the row "
                                 "(after a prompt and the previous turns)")
            previous_end = start + len(g.tokens)
    if keep_routing and any(g.routes is None for t in trajectories for _, g in t.turns):
        raise ValueError("keep_routing: the rollout has no recorded routes (sample with record_routes=True)")
    # A row ends with its last generated token: later observations are never trained on.
    ends = [t.turns[-1][0] + len(t.turns[-1][1].tokens) for t in trajectories]
    b, s = len(trajectories), padded_length(max(ends) - 1)
    k = cfg.num_experts_per_tok
    inputs, targets = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    loss_mask, old_logp = np.zeros((b, s), bool), np.zeros((b, s), np.float32)
    recorded = [g.kept_counts is not None for t in trajectories for _, g in t.turns]
    if keep_sampling_mask and any(recorded) and not all(recorded):
        raise ValueError("keep_sampling_mask: some turns were sampled with top-p/top-k truncation and some without")
    truncated = keep_sampling_mask and all(recorded)
    kept = None
    if truncated:
        kept = np.full((b, s, _kept_width(trajectories)), -1, np.int32)
    routes = None
    if keep_routing:
        routes = np.broadcast_to(np.arange(k, dtype=np.int32), (cfg.num_moe_layers, b, s, k)).copy()
    for i, (t, end) in enumerate(zip(trajectories, ends)):
        row = np.asarray(t.tokens[:end], np.int32)
        inputs[i, :end - 1], targets[i, :end - 1] = row[:-1], row[1:]
        for start, g in t.turns:
            at = slice(start - 1, start - 1 + len(g.tokens))  # position start − 1 predicts the turn's first token
            loss_mask[i, at] = True
            old_logp[i, at] = g.logprobs
            if kept is not None:
                steps = np.repeat(np.arange(len(g.tokens)), g.kept_counts)
                slots = np.arange(len(g.kept_ids)) - np.repeat(np.cumsum(g.kept_counts) - g.kept_counts, g.kept_counts)
                kept[i, start - 1 + steps, slots] = g.kept_ids
        if routes is not None:
            last = t.turns[-1][1].routes
            if last.shape[1] != end - 1:
                raise ValueError(f"trajectories[{i}]: the last turn's routes cover {last.shape[1]} inputs, the row "
                                 f"has {end - 1}; its prompt must be the row up to that turn")
            routes[:, i, :end - 1] = last
    if kept is not None:
        kept[~loss_mask, 0] = targets[~loss_mask]  # off the mask the target alone keeps every log π finite
    return Batch(inputs, targets, loss_mask, old_logp, kept, routes)


def policy_logprobs(params, cfg, batch: Batch, *, temperature: float = 1.0, attention: str = "auto"):
    """Per-token log π(target) and entropy [B, S] of the policy `params` on a batch: the training
    forward replays the batch's routes (Keep Routing) and π is renormalised over its kept sets
    (Keep Sampling Mask). Differentiable in params. temperature: the sampler's τ (greedy: use 1)."""
    routes = None if batch.routes is None else jnp.asarray(batch.routes)
    logits = forward(params, jnp.asarray(batch.inputs), cfg, attention=attention, routes=routes)
    kept = None if batch.kept_ids is None else jnp.asarray(batch.kept_ids)
    return token_logprobs(logits, jnp.asarray(batch.targets), kept, temperature=temperature)
