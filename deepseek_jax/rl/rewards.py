"""Rule-based rewards (spec §8): exact-answer maths, code graded by its tests in the sandbox, and
the optional terms: a length penalty, format checks and a language-consistency score. A reward
function never raises on model output: a bad completion (no answer, broken code, a sandbox
violation) scores 0 with a reason.
"""

import collections
import dataclasses
import re
import unicodedata
from fractions import Fraction

from deepseek_jax.rl import sandbox

_NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


@dataclasses.dataclass(frozen=True)
class Reward:
    value: float
    reason: str  # "correct", "wrong", "no_answer", or the sandbox status ("error", "timeout", ...)


def _final_text(completion: str) -> str:
    """The answer part: after the last `</think>` when the completion reasons first."""
    return completion.rsplit("</think>", 1)[-1]


def parse_final_answer(completion: str) -> str | None:
    """The completion's final answer as a string, or None. In order: the last \\boxed{...}; the
    number after the last "answer is" / "answer:" / "####"; else the last number in the text."""
    text = _final_text(completion).translate(_MINUS)
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    marked = re.findall(r"(?:answer\s*(?:is|:)|####)\s*\$?\s*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    if marked:
        return marked[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _as_number(s: str) -> Fraction | None:
    s = s.translate(_MINUS).strip().rstrip(".").replace(",", "").replace(" ", "").lstrip("+")
    s = s.removeprefix("$")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_reward(completion: str, answer: str) -> Reward:
    """1 when the final answer equals `answer` exactly (as numbers: "12" == "12.0" == "24/2";
    otherwise as stripped strings), else 0."""
    got = parse_final_answer(completion)
    if got is None:
        return Reward(0.0, "no_answer")
    a, b = _as_number(got), _as_number(answer)
    same = a == b if a is not None and b is not None else got.strip() == answer.strip()
    return Reward(1.0 if same else 0.0, "correct" if same else "wrong")


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", flags=re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block of the answer part (```python ... ``` or ``` ... ```), else the
    whole answer part."""
    blocks = _CODE_BLOCK.findall(_final_text(completion))
    return blocks[-1] if blocks else _final_text(completion)


def has_final_answer(completion: str) -> bool:
    """The maths format: the completion states a final answer (`parse_final_answer`)."""
    return parse_final_answer(completion) is not None


def has_code_block(completion: str) -> bool:
    """The code format: the answer part holds a fenced code block."""
    return _CODE_BLOCK.search(_final_text(completion)) is not None


def code_reward(completion: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> Reward:
    """1 when the completion's code followed by `tests` runs to completion in the sandbox, else 0
    with the sandbox's status as the reason ("error", "timeout", "memory", "blocked", "crashed")."""
    result = sandbox.run_python(extract_code(completion) + "\n\n" + tests, timeout_s=timeout_s, memory_mb=memory_mb)
    return Reward(1.0, "correct") if result.status == "ok" else Reward(0.0, result.status)


def length_penalty(num_tokens: int, max_tokens: int, *, budget: float = 0.8, scale: float = 0.5) -> float:
    """A penalty in [-scale, 0] growing linearly from budget·max_tokens to max_tokens (0 below)."""
    start = budget * max_tokens
    if num_tokens <= start:
        return 0.0
    return -scale * min(1.0, (num_tokens - start) / max(max_tokens - start, 1.0))


_WORD = re.compile(r"[^\W\d_]+")


def _script(char: str) -> str:
    """The Unicode script of a letter, from its name: LATIN, CYRILLIC, CJK, HIRAGANA, ..."""
    return unicodedata.name(char, "UNKNOWN").split()[0]


def language_consistency(completion: str, prompt: str) -> float:
    """The share of the completion's words written in the prompt's main script (1 when the
    completion has no words): DeepSeek-R1's language-consistency reward, the proportion of the
    target language's words, with the script of the letters standing for the language."""
    letters = collections.Counter(_script(c) for word in _WORD.findall(prompt) for c in word)
    words = _WORD.findall(completion)
    if not words or not letters:
        return 1.0
    target = letters.most_common(1)[0][0]
    return sum(_script(w[0]) == target for w in words) / len(words)
