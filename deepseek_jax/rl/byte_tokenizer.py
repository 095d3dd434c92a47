"""A byte-level tokenizer for the RL recipe's tiny policies (vocabulary 256).

A token is a byte of the UTF-8 text, except that the chat format's special strings (spec §9)
are single tokens, as in DeepSeek's tokenizer, on byte values that text never holds: BOS 0,
EOS 1, `<｜User｜>` 2, `<｜Assistant｜>` 3, `<think>` 4, `</think>` 5 and the DSML marker 6.
Text containing one of those raw bytes is refused.
"""

import re
from collections.abc import Iterable

from deepseek_jax.chat.markup import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    THINK_END,
    THINK_START,
    USER,
)

SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)
BOS_ID, EOS_ID = 0, 1
VOCAB_SIZE = 256
_SPECIAL = re.compile("|".join(re.escape(s) for s in SPECIALS))


def _text_bytes(text: str) -> list[int]:
    ids = list(text.encode())
    if min(ids, default=len(SPECIALS)) < len(SPECIALS):
        raise ValueError(f"encode: bytes 0-{len(SPECIALS) - 1} stand for the chat format's special strings, "
                         f"found one in {text!r:.80}")
    return ids


def encode(text: str) -> list[int]:
    """Token ids of `text`: its special strings as single ids, everything else byte by byte."""
    ids, pos = [], 0
    for match in _SPECIAL.finditer(text):
        ids += _text_bytes(text[pos:match.start()])
        ids.append(SPECIALS.index(match.group()))
        pos = match.end()
    return ids + _text_bytes(text[pos:])


def decode(ids: Iterable[int]) -> str:
    """The text of token ids (invalid UTF-8 becomes U+FFFD), special ids as their strings."""
    pieces, run = [], bytearray()
    for t in map(int, ids):
        if not 0 <= t < VOCAB_SIZE:
            raise ValueError(f"decode: token ids lie in [0, {VOCAB_SIZE}), got {t}")
        if t < len(SPECIALS):
            pieces += [run.decode(errors="replace"), SPECIALS[t]]
            run = bytearray()
        else:
            run.append(t)
    return "".join(pieces) + run.decode(errors="replace")
