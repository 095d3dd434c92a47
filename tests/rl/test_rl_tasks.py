"""experiments/rl.py on the code and agent tasks (spec §8): one GRPO step each runs end to end,
every episode is graded by its task's verifier (code: the tests in the sandbox; agent: the
chat-format parse and the environment's verifier), and the rows carry the contract's metrics.
The tiny byte-level policy solves neither task; the batches themselves are checked in
test_multiturn.py and test_rollout.py, the warm-up in test_rl_binary.py."""

import json
import os

import pytest

from deepseek_jax.rl import rewards
from deepseek_jax.rl.envs import agent
from experiments import rl
from experiments.configs import rl_agent, rl_code

MAX_POSITIONS = 4096  # one model config for both tasks: the init is compiled once


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _check_rows(rows):
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("reward_mean", "pass_at_1", "kl", "masked_fraction", "clip_fraction", "entropy", "response_length",
                "truncated", "tokens_per_s"):
        assert key in rows[1]


@pytest.mark.slow
def test_code_task_graded_in_the_sandbox(tmp_path, monkeypatch):
    graded = []

    def spy(completion, tests, **kwargs):
        graded.append(tests)
        return code_reward(completion, tests, **kwargs)

    code_reward = rewards.code_reward
    monkeypatch.setattr(rewards, "code_reward", spy)
    c = rl_code.get_config()
    c.model.max_position_embeddings = MAX_POSITIONS
    c.update(sft_steps=0, steps=1, inner_steps=1, prompts_per_step=1, group_size=2, eval_tasks=2,
             max_new_tokens=24, top_k=32)
    summary = rl.run(c, str(tmp_path), progress=False)
    _check_rows(_rows(tmp_path))
    # 2 held-out tasks at the start and at the end, 2 samples of 1 task in the step.
    assert len(graded) == 6 and all("assert f(" in t for t in graded)
    assert 0 <= summary["pass_at_1"] <= 1


@pytest.mark.slow
def test_agent_task_multi_turn_episodes(tmp_path, monkeypatch):
    verdicts = []

    def respond(game, completion, truncated):
        observation = agent_respond(game, completion, truncated)
        verdicts.append(game.reward().reason)
        return observation

    agent_respond = agent.AgentGame.respond
    monkeypatch.setattr(agent.AgentGame, "respond", respond)
    c = rl_agent.get_config()
    c.model.max_position_embeddings = MAX_POSITIONS
    c.update(steps=1, inner_steps=1, prompts_per_step=1, group_size=2, eval_tasks=2, max_turns=2,
             max_new_tokens=16, levels=(1,), top_k=32)
    rl.run(c, str(tmp_path), progress=False)
    rows = _rows(tmp_path)
    _check_rows(rows)
    assert len(verdicts) >= 6  # every reply of the 2 + 2 + 2 episodes went through the game
    assert set(verdicts) <= {"malformed", "truncated", "correct", "wrong", "unfinished"}
    assert 1 <= rows[1]["turns"] <= 2 and rows[1]["response_length"] <= 2 * 16
