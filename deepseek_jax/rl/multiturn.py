"""Multi-turn rollouts (spec §8, §9): episodes played in lock-step through `generate`, one token row each.

A game speaks text. `opening()` is its first prompt; `respond(completion, truncated)` takes the
model's reply (decoded, EOS included) and returns the next observation (say, tool results and
the markup that reopens the assistant's turn, rendered by the chat encoder) or None when the
episode is over; `reward()` scores the episode and `well_formed()` says whether every reply
followed the task's format. `SingleTurn` is the one-reply game of a maths or code task.

Each turn, the unfinished episodes are continued together by one `generate` call, each with its
own seed (so an episode does not depend on the rest of the batch). A reply's tokens stay in the
context verbatim and the observation is appended after them; nothing is re-encoded, so an
episode is one token row (`rollout.Trajectory`) whose generated spans carry the sampler's
log-probabilities and kept sets, and whose last turn's routes cover every earlier position (its
prefill recomputed them). `rollout.build_batch` puts the loss on exactly those spans. With one
user message per episode this is the thinking-retention rule: the reasoning of every earlier
turn stays in the context across tool calls, and only a new user message would drop it.

An episode ends when its game says so ("done", or "truncated" when the last reply reached
max_new_tokens; the game decides whether a cut reply can go on), when the context has no room
for another reply ("context"), or after max_turns replies ("max_turns").
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from deepseek_jax.chat.markup import EOS
from deepseek_jax.generate import generate
from deepseek_jax.rl.rewards import Reward
from deepseek_jax.rl.rollout import Trajectory


class Game(Protocol):
    def opening(self) -> str: ...
    def respond(self, completion: str, truncated: bool) -> str | None: ...
    def reward(self) -> Reward: ...
    def well_formed(self) -> bool: ...


class Tokenizer(Protocol):
    EOS_ID: int
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...


class SingleTurn:
    """A one-reply game: `score` grades the reply text (EOS removed), `check_format` its form."""

    def __init__(self, prompt: str, score: Callable[[str], Reward], check_format: Callable[[str], bool]):
        self.prompt, self.score, self.check_format = prompt, score, check_format
        self.outcome, self.formatted = Reward(0.0, "unfinished"), False

    def opening(self) -> str:
        return self.prompt

    def respond(self, completion: str, truncated: bool) -> None:
        completion = completion.removesuffix(EOS)
        self.outcome = self.score(completion)  # once: grading code runs a subprocess
        self.formatted = not truncated and self.check_format(completion)

    def reward(self) -> Reward:
        return self.outcome

    def well_formed(self) -> bool:
        return self.formatted


@dataclasses.dataclass
class Episode:
    trajectory: Trajectory
    finish: str  # "done", "truncated", "context" or "max_turns"

    @property
    def generated_tokens(self) -> int:
        return sum(len(g.tokens) for _, g in self.trajectory.turns)


def episode_seed(seed: int, turn: int, index: int) -> int:
    """The sampling seed of episode `index` at `turn` (a uint32, distinct per triple)."""
    return int(np.random.SeedSequence([seed, turn, index]).generate_state(1)[0])


def play(params, cfg, games: Sequence[Game], tokenizer: Tokenizer, *, max_new_tokens: int, max_turns: int = 1,
         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
         record_routes: bool = True) -> list[Episode]:
    """Plays every game to its end (see the module docstring) -> one Episode per game, in order."""
    if max_turns < 1:
        raise ValueError(f"max_turns: expected >= 1, got {max_turns}")
    tokens = [tokenizer.encode(g.opening()) for g in games]
    room = cfg.max_position_embeddings - max_new_tokens
    too_long = [i for i, t in enumerate(tokens) if len(t) > room]
    if too_long:
        raise ValueError(f"games[{too_long[0]}]: opening of {len(tokens[too_long[0]])} tokens + max_new_tokens "
                         f"{max_new_tokens} exceeds cfg.max_position_embeddings ({cfg.max_position_embeddings})")
    turns = [[] for _ in games]
    finish = [None] * len(games)
    for turn in range(max_turns):
        for i, t in enumerate(tokens):
            if finish[i] is None and len(t) > room:
                finish[i] = "context"
        active = [i for i, f in enumerate(finish) if f is None]
        if not active:
            break
        gens = generate(params, cfg, [tokens[i] for i in active], max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=[episode_seed(seed, turn, i) for i in active],
                        eos_ids=(tokenizer.EOS_ID,), record_routes=record_routes)
        for i, g in zip(active, gens):
            turns[i].append((len(tokens[i]), g))
            tokens[i] = tokens[i] + g.tokens.tolist()
            truncated = g.finish_reason == "length"
            observation = games[i].respond(tokenizer.decode(g.tokens), truncated)
            if observation is None:
                finish[i] = "truncated" if truncated else "done"
            else:
                tokens[i] += tokenizer.encode(observation)
    return [Episode(Trajectory(np.asarray(t, np.int32), tuple(ts)), f or "max_turns")
            for t, ts, f in zip(tokens, turns, finish)]
