"""Exact-answer arithmetic tasks generated at difficulty levels 1-5 (spec §8, rule-based rewards).

  1: a + b, one-digit operands          2: a ± b, two-digit operands
  3: a × b, one- and two-digit operands 4: (a op b) op c with parentheses
  5: solve a·x + b = c for the integer x

Each task has a prompt ("Q: ... A:") and its exact answer as a canonical integer string; the
reward (rewards.math_reward) parses the completion's final answer and compares it exactly.
Tasks are a pure function of (level, seed), so train and held-out sets never drift.
"""

import dataclasses

import numpy as np

LEVELS = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class MathTask:
    prompt: str
    answer: str
    level: int


def _question(level, rng):
    if level == 1:
        a, b = rng.integers(0, 10, 2)
        return f"{a}+{b}", a + b
    if level == 2:
        a, b = rng.integers(10, 100, 2)
        op = rng.choice(["+", "-"])
        return f"{a}{op}{b}", a + b if op == "+" else a - b
    if level == 3:
        a, b = rng.integers(2, 10), rng.integers(2, 100)
        return f"{a}*{b}", a * b
    if level == 4:
        a, b, c = rng.integers(1, 20, 3)
        op1, op2 = rng.choice(["+", "-", "*"], 2)
        inner = {"+": a + b, "-": a - b, "*": a * b}[op1]
        value = {"+": inner + c, "-": inner - c, "*": inner * c}[op2]
        return f"({a}{op1}{b}){op2}{c}", value
    a, x, b = rng.integers(2, 10), rng.integers(-10, 11), rng.integers(-20, 21)
    return f"solve {a}*x{'+' if b >= 0 else '-'}{abs(b)}={a * x + b}, x=?", x


def make_tasks(n: int, level: int, seed: int = 0) -> list[MathTask]:
    """n tasks of one difficulty level, a pure function of (level, seed)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    rng = np.random.default_rng([seed, level])
    tasks = []
    for _ in range(n):
        question, value = _question(level, rng)
        tasks.append(MathTask(prompt=f"Q: {question} A:", answer=str(int(value)), level=level))
    return tasks
