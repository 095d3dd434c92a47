"""GRPO rollouts and the training-side log-probabilities (spec §8).

`sample_groups` draws G completions per prompt through `generate` (one seed per sample, expert
routes recorded for Keep Routing, the sampler's kept sets for Keep Sampling Mask), in
prompt-major order. `build_batch` lays them out for training: row i holds prompt + completion
minus its last token (the inputs whose logits produced the completion), `targets` the next
tokens, `loss_mask` the completion positions, `old_logp` the sampler's log π_old there,
`kept_mask` its kept sets and `routes` its experts. `policy_logprobs` runs the training
forward with those routes (Keep Routing) and renormalises over the kept sets; with unchanged
params it reproduces the sampler's log-probabilities.

Legend: B sequences (prompts × G), S padded input length, V vocab, L MoE layers, K experts per token.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from deepseek_jax.generate import Generation, generate
from deepseek_jax.model import forward
from deepseek_jax.rl.grpo import token_logprobs

LENGTH_BUCKET = 16  # padded input length: a multiple of this, so nearby batches share compiled steps


@dataclasses.dataclass
class Rollout:
    prompts: list[list[int]]        # [B] prompt token ids, each prompt repeated G times
    generations: list[Generation]   # [B] prompt-major: the G samples of prompt p are rows p·G .. p·G + G − 1
    group_size: int

    @property
    def truncated(self) -> int:
        """Completions cut by max_new_tokens (finish_reason "length")."""
        return sum(g.finish_reason == "length" for g in self.generations)


class Batch(NamedTuple):
    inputs: np.ndarray            # [B, S] int32: prompt + completion[:-1], right-padded with 0
    targets: np.ndarray           # [B, S] int32: the token each input position predicts
    loss_mask: np.ndarray         # [B, S] bool: positions whose target is a completion token
    old_logp: np.ndarray          # [B, S] float32: the sampler's log π_old(target) (0 off the mask)
    kept_mask: np.ndarray | None  # [B, S, V] bool: the sampler's kept sets (all True off the mask); None: no truncation
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


def build_batch(rollout: Rollout, cfg, *, keep_sampling_mask: bool = True, keep_routing: bool = True) -> Batch:
    """The training batch of a rollout (see the module docstring)."""
    gens, prompts = rollout.generations, rollout.prompts
    if keep_routing and any(g.routes is None for g in gens):
        raise ValueError("keep_routing: the rollout has no recorded routes (sample with record_routes=True)")
    lengths = [len(p) + len(g.tokens) - 1 for p, g in zip(prompts, gens)]
    b, s = len(gens), -(-max(lengths) // LENGTH_BUCKET) * LENGTH_BUCKET
    v, k = cfg.vocab_size, cfg.num_experts_per_tok
    inputs, targets = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    loss_mask, old_logp = np.zeros((b, s), bool), np.zeros((b, s), np.float32)
    truncated = keep_sampling_mask and any(g.kept_counts is not None for g in gens)
    kept = np.ones((b, s, v), bool) if truncated else None
    routes = None
    if keep_routing:
        routes = np.broadcast_to(np.arange(k, dtype=np.int32), (cfg.num_moe_layers, b, s, k)).copy()
    for i, (p, g) in enumerate(zip(prompts, gens)):
        full = np.concatenate([np.asarray(p, np.int32), g.tokens])
        n, start = lengths[i], len(p) - 1  # position start predicts the first completion token
        inputs[i, :n], targets[i, :n] = full[:-1], full[1:]
        loss_mask[i, start:n] = True
        old_logp[i, start:n] = g.logprobs
        if kept is not None:
            kept[i, start:n] = g.kept_mask(v)
        if routes is not None:
            routes[:, i, :n] = g.routes
    return Batch(inputs, targets, loss_mask, old_logp, kept, routes)


def policy_logprobs(params, cfg, batch: Batch, *, temperature: float = 1.0, attention: str = "auto"):
    """Per-token log π(target) and entropy [B, S] of the policy `params` on a batch: the training
    forward replays the batch's routes (Keep Routing) and π is renormalised over its kept sets
    (Keep Sampling Mask). Differentiable in params. temperature: the sampler's τ (greedy: use 1)."""
    routes = None if batch.routes is None else jnp.asarray(batch.routes)
    logits = forward(params, jnp.asarray(batch.inputs), cfg, attention=attention, routes=routes)
    kept = None if batch.kept_mask is None else jnp.asarray(batch.kept_mask)
    return token_logprobs(logits, jnp.asarray(batch.targets), kept, temperature=temperature)
