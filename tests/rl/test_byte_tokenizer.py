"""The RL recipe's byte-level tokenizer: bytes as tokens, the chat format's special strings as
single ids (spec §9), exact round trips, and a clear error for text holding their raw bytes."""

import pytest

from deepseek_jax.chat import encode_messages
from deepseek_jax.rl import byte_tokenizer as tok


def test_round_trip_and_special_ids():
    text = encode_messages([{"role": "user", "content": "Q: 2+3 é"}, {"role": "assistant", "content": "5"}],
                           "chat")
    ids = tok.encode(text)
    assert ids[:2] == [tok.BOS_ID, tok.SPECIALS.index(tok.USER)] and ids[-1] == tok.EOS_ID
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode()) - sum(len(s.encode()) - 1 for s in tok.SPECIALS if s in text)
    assert tok.encode("<think>a</think>") == [4, ord("a"), 5]
    assert tok.decode([ord("a"), 0xC3]) == "a\ufffd"  # a cut multi-byte character


def test_errors():
    with pytest.raises(ValueError, match="special strings"):
        tok.encode("a\x01b")
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([256])
