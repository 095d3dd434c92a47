"""Synthesized agent environments (spec §8): every generated environment is solvable by its
reference solution; scripted policies played through the V3.2 tool loop are rewarded by the
verifier (on the answer and on the database state); malformed or endless episodes score 0."""

import json

import pytest

from deepseek_jax.rl.envs import agent
from tests.chat.test_tool_loop import EOS, dsml


def _call(tool, **kwargs):
    return (tool, {k: (v if isinstance(v, str) else json.dumps(v), isinstance(v, str)) for k, v in kwargs.items()})


class Scripted:
    def __init__(self, *completions):
        self.completions, self.prompts = list(completions), []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return self.completions.pop(0)


def _oracle_script(env, *, pick=None):
    """Completions that follow the reference path; `pick` overrides the product ordered/named."""
    products = env.db["products"]
    if env.level == 1:
        name = env.task.split("price of the ")[1].split("?")[0]
        return [dsml(_call("get_product", name=name)) + EOS, f"The price is {products[name]['price']}." + EOS]
    category = next(c for c in agent._CATEGORIES if f" {c} " in env.task)
    listed = sorted(n for n, p in products.items() if p["category"] == category)
    looks = dsml(*[_call("get_product", name=n) for n in listed]) + EOS
    if env.level == 2:
        best = pick or min(listed, key=lambda n: products[n]["price"])
        return [dsml(_call("list_products", category=category)) + EOS, looks, f"The cheapest is {best}." + EOS]
    q = int(env.task.split()[1])
    best = pick or min((n for n in listed if products[n]["stock"] >= q), key=lambda n: products[n]["price"])
    return [dsml(_call("list_products", category=category)) + EOS, looks,
            dsml(_call("place_order", name=best, quantity=q)) + EOS, "Done." + EOS]


@pytest.mark.parametrize("level", agent.LEVELS)
def test_generated_envs_are_solvable_and_scripted_policy_wins(level):
    for seed in range(5):
        env = agent.make_env(level, seed)
        assert env.task == agent.make_env(level, seed).task and env.db == agent.make_env(level, seed).db
        policy = Scripted(*_oracle_script(env))
        history, reward = agent.run_episode(policy, env)
        assert reward == agent.Reward(1.0, "correct"), (env.task, history[-1])
        assert env.db["orders"] == []  # the episode ran on a copy
        assert [m["role"] for m in history][:3] == ["system", "user", "assistant"]
        if level > 1:  # tool results were fed back into the next prompt
            assert "<result>" in policy.prompts[1]


def test_wrong_answers_and_bad_episodes_score_zero():
    env = agent.make_env(3, 0)
    products = env.db["products"]
    q = int(env.task.split()[1])
    category = next(c for c in agent._CATEGORIES if f" {c} " in env.task)
    target = min((n for n, p in products.items() if p["category"] == category and p["stock"] >= q),
                 key=lambda n: products[n]["price"])
    other = next(n for n, p in products.items() if n != target and p["stock"] >= q)
    _, reward = agent.run_episode(Scripted(*_oracle_script(env, pick=other)), env)
    assert reward == agent.Reward(0.0, "wrong")  # ordered the wrong product: the database says so
    _, reward = agent.run_episode(Scripted("I ordered it." + EOS), env)
    assert reward == agent.Reward(0.0, "wrong")  # claiming is not doing
    _, reward = agent.run_episode(Scripted("no end of sentence"), env)
    assert reward == agent.Reward(0.0, "malformed")
    endless = Scripted(*[dsml(_call("list_products", category="tools")) + EOS] * 3)
    _, reward = agent.run_episode(endless, env, max_steps=3)
    assert reward == agent.Reward(0.0, "unfinished")
    with pytest.raises(ValueError, match="level"):
        agent.make_env(4, 0)
