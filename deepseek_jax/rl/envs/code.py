"""Code tasks generated at difficulty levels 1-3, graded by their tests in the sandbox (spec §8).

A task asks for one Python function; its tests are `assert` lines computed from a reference
solution on generated inputs. rewards.code_reward extracts the completion's last fenced code
block (or the whole text), appends the tests and runs them in sandbox.run_python.

  1: a one-line arithmetic function      2: a loop over a list
  3: a small algorithm (primes, digit sums, run-length encoding)
"""

import dataclasses

import numpy as np

LEVELS = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class CodeTask:
    prompt: str
    tests: str            # assert lines, run after the solution
    reference: str        # a correct solution (tests check it passes)
    level: int


def _primes_below(n):
    return [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def _run_length(s):
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)


def _spec(level, rng):
    """(statement, function name, reference source, [(args, expected)])."""
    if level == 1:
        k, m = int(rng.integers(2, 10)), int(rng.integers(-9, 10))
        xs = [int(x) for x in rng.integers(-50, 50, 4)]
        return (f"Write a Python function f(x) that returns {k}*x + ({m}).", "f",
                f"def f(x):\n    return {k} * x + ({m})\n", [((x,), k * x + m) for x in xs])
    if level == 2:
        t = int(rng.integers(0, 10))
        cases = [[int(v) for v in rng.integers(-5, 15, int(rng.integers(0, 7)))] for _ in range(4)]
        statement = f"Write a Python function f(xs) that returns the sum of the elements of the list xs greater than {t}."
        return (statement, "f",
                f"def f(xs):\n    return sum(x for x in xs if x > {t})\n", [((c,), sum(x for x in c if x > t)) for c in cases])
    kind = rng.choice(["primes", "digits", "rle"])
    if kind == "primes":
        ns = [int(n) for n in rng.integers(0, 60, 4)]
        return ("Write a Python function f(n) that returns the list of primes smaller than n, in increasing order.",
                "f", "def f(n):\n    return [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]\n",
                [((n,), _primes_below(n)) for n in ns])
    if kind == "digits":
        ns = [int(n) for n in rng.integers(0, 10 ** 6, 4)]
        return ("Write a Python function f(n) that returns the sum of the decimal digits of the integer n >= 0.", "f", "def f(n):\n    return sum(int(c) for c in str(n))\n",
                [((n,), sum(int(c) for c in str(n))) for n in ns])
    words = ["".join(rng.choice(list("aab"), int(rng.integers(0, 8)))) for _ in range(4)]
    statement = ("Write a Python function f(s) that run-length encodes the string s: each maximal run of one "
                 "character c of length k becomes c followed by k, e.g. 'aab' -> 'a2b1'.")
    reference = ("def f(s):\n    out = ''\n    i = 0\n    while i < len(s):\n        j = i\n"
                 "        while j < len(s) and s[j] == s[i]:\n            j += 1\n        out += s[i] + str(j - i)\n"
                 "        i = j\n    return out\n")
    return statement, "f", reference, [((w,), _run_length(w)) for w in words]


def make_tasks(n: int, level: int, seed: int = 0) -> list[CodeTask]:
    """n tasks of one difficulty level, a pure function of (level, seed)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    rng = np.random.default_rng([seed, level, 7])
    tasks = []
    for _ in range(n):
        statement, name, reference, cases = _spec(level, rng)
        tests = "".join(f"assert {name}(*{args!r}) == {want!r}, {args!r}\n" for args, want in cases)
        tasks.append(CodeTask(prompt=statement + " Answer with one ```python code block.", tests=tests,
                              reference=reference, level=level))
    return tasks
