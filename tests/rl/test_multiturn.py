"""Multi-turn rollouts (spec §8, §9) and their training rows.

Scripted replies (the reference path of a synthesized store environment) played through
`multiturn.play`: the verifier rewards them; the row the model saw is exactly what the chat
encoder renders for the conversation (so tool results were fed back and, in thinking mode, the
turn's reasoning retained across tool calls); the batch's loss mask covers exactly the generated
tokens, with their log-probabilities in order. With the tiny model over several turns, the
training forward replaying the last turn's routes over its kept sets reproduces the sampler's
log-probabilities of every turn."""

import itertools

import numpy as np
import pytest

from deepseek_jax import ModelConfig
from deepseek_jax.chat import encode_messages
from deepseek_jax.generate import Generation
from deepseek_jax.rl import byte_tokenizer, multiturn, rollout
from deepseek_jax.rl.envs import agent
from deepseek_jax.rl.rewards import Reward
from tests.rl.test_agent_env import _oracle_script
from tests.test_generate import random_params


class ScriptedGenerate:
    """Stands in for `generate`: each call answers every prompt with its episode's next scripted
    reply; log-probabilities count up over all tokens, so misalignment shows."""

    def __init__(self, scripts):
        self.scripts, self.prompts, self.next_logp = [list(s) for s in scripts], [], 0.0

    def __call__(self, params, cfg, prompts, max_new_tokens, **kwargs):
        out = []
        for prompt in prompts:
            self.prompts.append(list(prompt))
            episode = next(i for i, s in enumerate(self.scripts) if self._owner(i, prompt))
            tokens = np.asarray(byte_tokenizer.encode(self.scripts[episode].pop(0)), np.int32)
            logprobs = -(self.next_logp + np.arange(len(tokens), dtype=np.float32)) / 1000
            self.next_logp += len(tokens)
            out.append(Generation(tokens, logprobs, "eos", None, None, None))
        return out

    def _owner(self, i, prompt):
        return bool(self.scripts[i]) and self.openings[i] == prompt[:len(self.openings[i])]


def _thinking(script):
    """The oracle's replies with reasoning first (thinking mode)."""
    return [f"step {k}: use the tools.</think>" + reply for k, reply in enumerate(script)]


@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
def test_scripted_episodes_rows_and_batch(monkeypatch, thinking_mode):
    envs = [agent.make_env(level, seed) for level, seed in ((1, 0), (3, 1))]
    scripts = [_oracle_script(env) for env in envs]
    if thinking_mode == "thinking":
        scripts = [_thinking(s) for s in scripts]
    games = [agent.AgentGame(env, thinking_mode) for env in envs]
    fake = ScriptedGenerate(scripts)
    fake.openings = [byte_tokenizer.encode(g.opening()) for g in games]
    monkeypatch.setattr(multiturn, "generate", fake)
    cfg = ModelConfig.preset("tiny", max_position_embeddings=8192)
    episodes = multiturn.play(None, cfg, games, byte_tokenizer, max_new_tokens=400, max_turns=6,
                              record_routes=False)

    assert [g.reward() for g in games] == [Reward(1.0, "correct")] * 2
    assert [e.finish for e in episodes] == ["done", "done"]
    assert [len(e.trajectory.turns) for e in episodes] == [2, 4]
    for game, episode in zip(games, episodes):
        # The row is the chat encoding of the whole conversation: the replies' own tokens, the
        # tool results rendered after them, and (thinking) every reply's reasoning kept.
        assert byte_tokenizer.decode(episode.trajectory.tokens) == encode_messages(game.history, thinking_mode)
        if thinking_mode == "thinking":
            assert byte_tokenizer.decode(episode.trajectory.tokens).count("use the tools.</think>") == \
                len(episode.trajectory.turns)
    # Each later prompt extends the previous one (tool results fed back, nothing re-encoded).
    by_episode = [[p for p in fake.prompts if p[:len(o)] == o] for o in fake.openings]
    for prompts in by_episode:
        assert all(b[:len(a)] == a and len(b) > len(a) for a, b in itertools.pairwise(prompts))
        assert "<result>" in byte_tokenizer.decode(prompts[-1])

    batch = rollout.build_batch([e.trajectory for e in episodes], cfg, keep_routing=False)
    assert batch.kept_ids is None and batch.routes is None
    for i, episode in enumerate(episodes):
        turns = episode.trajectory.turns
        generated = np.concatenate([g.tokens for _, g in turns])
        assert batch.loss_mask[i].sum() == len(generated)
        np.testing.assert_array_equal(batch.targets[i][batch.loss_mask[i]], generated)
        np.testing.assert_array_equal(batch.old_logp[i][batch.loss_mask[i]],
                                      np.concatenate([g.logprobs for _, g in turns]))
        assert (batch.old_logp[i][~batch.loss_mask[i]] == 0).all()
        end = turns[-1][0] + len(turns[-1][1].tokens)
        np.testing.assert_array_equal(batch.inputs[i, :end - 1], episode.trajectory.tokens[:end - 1])
        # Prompt and tool results are inputs only: no target of theirs is under the mask.
        masked_text = byte_tokenizer.decode(batch.targets[i][batch.loss_mask[i]])
        assert "<result>" not in masked_text and "</function_results>" not in masked_text


class EchoGame:
    """Answers every reply with a fixed observation for `turns` turns, then ends; reward 1."""

    def __init__(self, prompt, turns):
        self.prompt, self.turns, self.replies = prompt, turns, []

    def opening(self):
        return self.prompt

    def respond(self, completion, truncated):
        self.replies.append(completion)
        return "\nok\n" if len(self.replies) < self.turns else None

    def reward(self):
        return Reward(1.0, "correct")

    def well_formed(self):
        return True


def test_model_episodes_replay_sampler_logprobs():
    cfg = ModelConfig.preset("tiny")
    params = random_params(cfg, std=0.05)
    games = [EchoGame(byte_tokenizer.BOS + "Q: hi A:", 3) for _ in range(2)]
    episodes = multiturn.play(params, cfg, games, byte_tokenizer, max_new_tokens=5, max_turns=3, top_k=16,
                              seed=1)
    assert all(len(e.trajectory.turns) == 3 for e in episodes)
    assert episodes[0].trajectory.turns[0][1].tokens.tolist() != episodes[1].trajectory.turns[0][1].tokens.tolist()
    for game, episode in zip(games, episodes):
        assert game.replies == [byte_tokenizer.decode(g.tokens) for _, g in episode.trajectory.turns]
        assert byte_tokenizer.decode(episode.trajectory.tokens).count("\nok\n") >= 2
    batch = rollout.build_batch([e.trajectory for e in episodes], cfg)
    assert batch.kept_ids.shape[-1] == 16
    logp, _ = rollout.policy_logprobs(params, cfg, batch)
    m = batch.loss_mask
    assert m.sum() == sum(e.generated_tokens for e in episodes)
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=1e-5)


def test_play_errors():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        multiturn.play(None, cfg, [EchoGame("x" * 300, 1)], byte_tokenizer, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_turns"):
        multiturn.play(None, cfg, [EchoGame("x", 1)], byte_tokenizer, max_new_tokens=8, max_turns=0)
