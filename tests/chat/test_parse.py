"""parse_completion: encode -> parse round trips, agreement with DeepSeek's parser, and malformed completions."""

import copy
import json
import pathlib

import pytest

from deepseek_jax.chat import CompletionError, encode_messages, parse_completion

EOS = "<｜end▁of▁sentence｜>"
GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "golden_dsv32.json").read_text(encoding="utf-8"))
CALLS_OPEN, CALLS_CLOSE = "\n\n<｜DSML｜function_calls>\n", "\n</｜DSML｜function_calls>"


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def param(key, value, string=True):
    return f'<｜DSML｜parameter name="{key}" string="{"true" if string else "false"}">{value}</｜DSML｜parameter>'


def assistant_turns():
    """(name, conversation, index) of every assistant message of the golden conversations."""
    return [(f"{name}{k}", conv, k) for name, conv in GOLDEN["conversations"].items()
            for k, m in enumerate(conv) if m["role"] == "assistant"]


def expected_message(msg, conversation, k, mode):
    """What the rendered text of conversation[k] can give back: reasoning only where it is rendered, no ids."""
    last_user = max(i for i, m in enumerate(conversation[:k]) if m["role"] in ("user", "developer"))
    return {"role": "assistant", "content": msg.get("content") or "",
            "reasoning_content": (msg.get("reasoning_content") or "") if mode == "thinking" and k > last_user else "",
            "tool_calls": [{"type": "function", "function": dict(c["function"])} for c in msg.get("tool_calls") or []]}


@pytest.mark.parametrize("mode", ["thinking", "chat"])
@pytest.mark.parametrize("name,conversation,k", assistant_turns(), ids=lambda x: x if isinstance(x, str) else "")
def test_round_trip(name, conversation, k, mode):
    text = encode_messages([conversation[k]], mode, context=conversation[:k])
    parsed = parse_completion(text, mode)
    assert parsed == expected_message(conversation[k], conversation, k, mode)
    # ... and the parsed message encodes back to the same text (what the tool loop relies on).
    assert encode_messages([parsed], mode, context=conversation[:k]) == text


@pytest.mark.parametrize("reply", GOLDEN["replies"], ids=lambda r: r["name"])
def test_matches_deepseek_reference_parser(reply):
    assert parse_completion(reply["text"], reply["thinking_mode"]) == reply["parsed"]


def test_parses_model_style_output():
    text = ("Let me compute.</think>Computing." + CALLS_OPEN
            + invoke("calc", param("expression", "6 * 7"), param("precise", "true", string=False)) + "\n"
            + invoke("clock") + CALLS_CLOSE + EOS)
    assert parse_completion(text, "thinking") == {
        "role": "assistant", "content": "Computing.", "reasoning_content": "Let me compute.",
        "tool_calls": [{"type": "function", "function": {"name": "calc",
                                                          "arguments": '{"expression": "6 * 7", "precise": true}'}},
                       {"type": "function", "function": {"name": "clock", "arguments": "{}"}}]}


def test_values_string_raw_others_json():
    text = "".join([CALLS_OPEN, invoke("f", param("s", 'say "hi"\nthen <b>'), param("n", "-1.5e3", string=False),
                                       param("l", '[1, "é", null]', string=False)), CALLS_CLOSE, EOS])
    arguments = json.loads(parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"s": 'say "hi"\nthen <b>', "n": -1500.0, "l": [1, "é", None]}


def test_eos_optional_after_calls_only():
    text = CALLS_OPEN + invoke("g") + CALLS_CLOSE
    assert parse_completion(text, "chat")["tool_calls"][0]["function"]["name"] == "g"
    with pytest.raises(CompletionError, match="not terminated by EOS"):
        parse_completion("an answer cut short", "chat")


def test_chat_mode_has_no_reasoning():
    assert parse_completion(f"hello{EOS}", "chat") == {"role": "assistant", "content": "hello",
                                                      "reasoning_content": "", "tool_calls": []}


@pytest.mark.parametrize("text,mode,match", [
    (f"no think end{EOS}", "thinking", "reasoning is not closed"),
    (f"r</think>a{EOS}extra", "thinking", "unexpected text after EOS"),
    ("r</think>" + CALLS_OPEN + invoke("g"), "thinking", "unterminated DSML block"),
    (CALLS_OPEN + invoke("g") + CALLS_CLOSE + "more" + EOS, "chat", "unexpected text after"),
    (CALLS_OPEN + '<｜DSML｜invoke name="g">' + CALLS_CLOSE + EOS, "chat", "malformed DSML at offset"),
    (CALLS_OPEN + invoke("g") + invoke("h") + CALLS_CLOSE + EOS, "chat", "expected a newline and another invoke"),
    (CALLS_OPEN + CALLS_CLOSE.lstrip("\n") + EOS, "chat", "malformed DSML"),
    (CALLS_OPEN + invoke("f", param("n", "three", string=False)) + CALLS_CLOSE + EOS, "chat",
     "parameter 'n' has string=\"false\" but its value is not JSON"),
    (CALLS_OPEN + invoke("f", param("a", "1"), param("a", "2")) + CALLS_CLOSE + EOS, "chat", "'a' given twice"),
    (CALLS_OPEN + invoke("f", param("a", "1") + param("b", "2")) + CALLS_CLOSE + EOS, "chat",
     "expected a newline and another parameter"),
    (CALLS_OPEN + invoke("f", param("a", "1") + "\n") + CALLS_CLOSE + EOS, "chat", "another parameter"),
    (CALLS_OPEN + invoke("f", '<｜DSML｜parameter name="a" string="maybe">1</｜DSML｜parameter>') + CALLS_CLOSE + EOS,
     "chat", "malformed parameter"),
    (CALLS_OPEN + invoke("f", param("a", "<think>")) + CALLS_CLOSE + EOS, "chat", "reserved marker '<think>'"),
    (CALLS_OPEN + invoke("f", param("a", '"\\u003c/think>"', string=False)) + CALLS_CLOSE + EOS, "chat",
     "reserved marker '</think>'"),
    (CALLS_OPEN + invoke("<｜User｜>") + CALLS_CLOSE + EOS, "chat", "invalid tool name"),
    (f"a<｜User｜>b{EOS}", "chat", "content contains the reserved marker '<｜User｜>'"),
    (f"r<think>r</think>a{EOS}", "thinking", "reasoning_content contains the reserved marker '<think>'"),
    (f"a</think>b{EOS}", "chat", "content contains the reserved marker '</think>'"),
    (f"a{EOS}", "reasoning", "thinking_mode must be one of"),
])
def test_malformed_completions_raise(text, mode, match):
    with pytest.raises(ValueError, match=match):
        parse_completion(text, mode)


def test_completion_error_is_a_value_error():
    assert issubclass(CompletionError, ValueError)
    with pytest.raises(CompletionError):
        parse_completion("r</think>" + CALLS_OPEN + invoke("g"), "thinking")


def test_parse_does_not_touch_golden_conversations():
    before = copy.deepcopy(GOLDEN["conversations"])
    for _, conversation, k in assistant_turns():
        parse_completion(encode_messages([conversation[k]], "thinking", context=conversation[:k]), "thinking")
    assert GOLDEN["conversations"] == before
