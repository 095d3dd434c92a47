"""Rewards and environments (spec §8): answer parsing, exact maths grading, generated tasks, and
the code sandbox stopping an infinite loop, a fork bomb, a network call, a memory bomb and
writes outside its folder with a failure reward (never an exception in the trainer)."""

import os

import pytest

from deepseek_jax.rl import rewards, sandbox
from deepseek_jax.rl.envs import code as code_env
from deepseek_jax.rl.envs import math as math_env


@pytest.mark.parametrize("completion, want", [
    ("7", "7"), ("The answer is 42.", "42"), ("so 3+4 = 7 and then 8", "8"), ("\\boxed{-3} and 5", "-3"),
    ("Answer: 1,234", "1,234"), ("#### 12", "12"), ("<think>maybe 5</think> 6", "6"), ("no digits", None),
    ("the answer is \u22124", "-4"), ("result 3/4", "3/4"),
])
def test_parse_final_answer(completion, want):
    assert rewards.parse_final_answer(completion) == want


def test_math_reward():
    assert rewards.math_reward(" 12", "12") == rewards.Reward(1.0, "correct")
    assert rewards.math_reward("answer: 12.0", "12").value == 1.0
    assert rewards.math_reward("\\boxed{24/2}", "12").value == 1.0
    assert rewards.math_reward("answer: 1,234", "1234").value == 1.0
    assert rewards.math_reward("13", "12") == rewards.Reward(0.0, "wrong")
    assert rewards.math_reward("121", "12").value == 0.0  # exact, not a prefix match
    assert rewards.math_reward("", "12") == rewards.Reward(0.0, "no_answer")
    assert rewards.math_reward("<think>12</think>", "12").value == 0.0  # thinking is not the answer


def test_math_tasks():
    for level in math_env.LEVELS:
        tasks = math_env.make_tasks(20, level, seed=3)
        assert tasks == math_env.make_tasks(20, level, seed=3)
        assert tasks != math_env.make_tasks(20, level, seed=4)
        for t in tasks:
            assert t.prompt.startswith("Q: ") and t.prompt.endswith(" A:") and t.level == level
            question = t.prompt[3:-3]
            if level < 5:  # the answer is the expression's value
                assert str(eval(question)) == t.answer
            else:  # a·x + b = c holds at x = answer
                lhs, rhs = question.removeprefix("solve ").removesuffix(", x=?").split("=")
                assert eval(lhs.replace("x", f"({t.answer})")) == int(rhs)
            assert rewards.math_reward(f" {t.answer}", t.answer).value == 1.0
    with pytest.raises(ValueError, match="level"):
        math_env.make_tasks(1, 6)


def test_code_tasks_reference_passes_and_wrong_fails():
    tasks = [t for level in code_env.LEVELS for t in code_env.make_tasks(2, level, seed=1)]
    for t in tasks:
        assert rewards.code_reward(f"Sure.\n```python\n{t.reference}```\n", t.tests) == rewards.Reward(1.0, "correct")
    assert rewards.code_reward("```python\ndef f(*a):\n    return None\n```", tasks[0].tests).reason == "error"
    assert rewards.code_reward("no code here", tasks[0].tests).reason == "error"


@pytest.mark.parametrize("code, status", [
    ("while True:\n    pass\n", "timeout"),
    ("import os\nwhile True:\n    try:\n        os.fork()\n    except BaseException:\n        pass\n", "blocked"),
    ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n", "blocked"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "blocked"),
    ("import socket\nsocket.socket()\n", "blocked"),
    ("import urllib.request\nurllib.request.urlopen('http://example.com')\n", "blocked"),
    ("open('/tmp/sandbox_escape_test.txt', 'w').write('x')\n", "blocked"),
    ("import os\nos.chdir('..')\nopen('sandbox_escape_test.txt', 'w')\n", "blocked"),
    ("open('../sandbox_escape_test.txt', 'a')\n", "blocked"),
    ("import os\nos.remove('/tmp/anything')\n", "blocked"),
    ("x = bytearray(4 << 30)\n", "memory"),
    ("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n", "ok"),
    ("raise SystemExit(3)\n", "error"),
])
def test_sandbox_stops(code, status):
    result = sandbox.run_python(code, timeout_s=1.5, memory_mb=256)
    assert result.status == status, result.stderr
    assert not os.path.exists("/tmp/sandbox_escape_test.txt")
    if status != "ok":
        assert rewards.code_reward(code, "", timeout_s=1.5, memory_mb=256) == rewards.Reward(0.0, status)


def test_sandbox_timeout_is_wall_clock():
    result = sandbox.run_python("import time\ntime.sleep(30)\n", timeout_s=1.0)
    assert result.status == "timeout" and result.seconds < 5


def test_length_penalty():
    assert rewards.length_penalty(50, 100) == 0.0
    assert rewards.length_penalty(90, 100) == pytest.approx(-0.25)
    assert rewards.length_penalty(100, 100) == pytest.approx(-0.5)


def test_format_checks():
    assert rewards.has_final_answer(" 12") and not rewards.has_final_answer(" twelve")
    assert rewards.has_code_block("```python\ndef f(x):\n    return x\n```")
    assert not rewards.has_code_block("def f(x):\n    return x")
    assert not rewards.has_code_block("```python\nx = 1\n```</think>no block in the answer")


def test_language_consistency():
    assert rewards.language_consistency("the answer is seven", "What is 3+4?") == 1.0
    assert rewards.language_consistency("the answer мир", "What is 3+4?") == 2 / 3
    assert rewards.language_consistency("答案 is 7", "问题是什么") == 0.5
    assert rewards.language_consistency(" 7", "Q: 3+4 A:") == 1.0  # no words: nothing inconsistent
    assert rewards.language_consistency("word", "3+4") == 1.0      # a prompt without words sets no language
