"""encode_messages: one exact expected string per rule of spec §9, and golden prompts from DeepSeek's encoder.

The golden file's prompts were produced by DeepSeek's reference `encoding/encoding_dsv32.py` (the HF
deepseek-ai/DeepSeek-V3.2 copy with the blank-line TOOLS_SYSTEM_TEMPLATE, checked against that release's
own `test_output.txt`) from conversations written for these tests; see `about` in the file.
"""

import json
import pathlib

import pytest

from deepseek_jax.chat import encode_messages

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "golden_dsv32.json").read_text(encoding="utf-8"))

# The tools block as DeepSeek's release writes it (blank lines between paragraphs), typed out here so the
# test does not share the implementation's template.
TOOLS_BLOCK = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<｜DSML｜function_calls>" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name="$FUNCTION_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$FUNCTION_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{"name": "echo", "description": "Echo ü", "parameters": {"type": "object", "properties": {"s": {"type": "string"}}}}
</functions>
"""  # noqa: E501
ECHO = {"type": "function", "function": {"name": "echo", "description": "Echo ü",
                                         "parameters": {"type": "object", "properties": {"s": {"type": "string"}}}}}
RESPONSE_BLOCK = ('## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n'
                  '{"type": "json_object"}')


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def user(text):
    return {"role": "user", "content": text}


# ----------------------------------------------------------------------------- BOS and context
def test_bos_only_without_context():
    assert encode_messages([user("hi")], "chat") == f"{BOS}{U}hi{A}</think>"
    assert encode_messages([user("hi")], "chat", add_bos=False) == f"{U}hi{A}</think>"
    assert encode_messages([user("hi")], "chat", context=[{"role": "system", "content": "S"}]) == f"{U}hi{A}</think>"
    assert encode_messages([], "chat") == BOS


def test_context_is_not_rendered_but_counts():
    history = [user("q1"), {"role": "assistant", "content": "a1", "reasoning_content": "r1"}]
    # The context's user message is not the last one any more: its assistant reply is history.
    assert encode_messages([user("q2")], "thinking", context=history) == f"{U}q2{A}<think>"
    # Rendering the reply itself against its context: after the last user message, so with reasoning.
    assert encode_messages(history[1:], "thinking", context=history[:1]) == f"r1</think>a1{EOS}"


# ----------------------------------------------------------------------------- last user index, drop_thinking
CONVERSATION = [user("q1"), {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                user("q2"), {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]


@pytest.mark.parametrize("drop_thinking", [True, False])
def test_reasoning_only_after_last_user(drop_thinking):
    # DeepSeek's renderer never writes reasoning before the last user message, whatever drop_thinking says.
    got = encode_messages(CONVERSATION, "thinking", drop_thinking=drop_thinking)
    assert got == f"{BOS}{U}q1{A}</think>a1{EOS}{U}q2{A}<think>r2</think>a2{EOS}"


def test_developer_counts_as_last_user():
    got = encode_messages(CONVERSATION[:2] + [{"role": "developer", "content": "d"}], "thinking")
    assert got == f"{BOS}{U}q1{A}</think>a1{EOS}{U}\n\n# The user's message is: d{A}<think>"


def test_earlier_developer_message_is_kept():
    # DeepSeek's drop_thinking=True path deletes it and then fails (spec §11.15); we render it.
    messages = [{"role": "developer", "content": "d1"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
                user("q")]
    expected = f"{BOS}{U}\n\n# The user's message is: d1{A}</think>a{EOS}{U}q{A}<think>"
    assert encode_messages(messages, "thinking") == expected
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected


# ----------------------------------------------------------------------------- system, tools, response format
def test_system_with_tools():
    got = encode_messages([{"role": "system", "content": "S", "tools": [ECHO]}], "chat")
    assert got == f"{BOS}S\n\n{TOOLS_BLOCK}"


def test_system_with_response_format_and_no_content():
    got = encode_messages([{"role": "system", "content": "S", "response_format": {"type": "json_object"}}], "chat")
    assert got == f"{BOS}S\n\n{RESPONSE_BLOCK}"
    got = encode_messages([{"role": "system", "tools": [ECHO], "response_format": {"type": "json_object"}}], "chat")
    assert got == f"{BOS}\n\n{TOOLS_BLOCK}\n\n{RESPONSE_BLOCK}"


@pytest.mark.parametrize("mode,think", [("thinking", "<think>"), ("chat", "</think>")])
def test_developer_with_tools_and_response_format(mode, think):
    msg = {"role": "developer", "content": "d", "tools": [ECHO], "response_format": {"type": "json_object"}}
    got = encode_messages([msg], mode)
    assert got == f"{BOS}{U}\n\n{TOOLS_BLOCK}\n\n{RESPONSE_BLOCK}\n\n# The user's message is: d{A}{think}"


# ----------------------------------------------------------------------------- user think suffix
def test_user_suffix_in_both_modes():
    messages = [user("q1"), {"role": "assistant", "content": "a1"}, user("q2")]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}q1{A}</think>a1{EOS}{U}q2{A}<think>"
    assert encode_messages(messages, "chat") == f"{BOS}{U}q1{A}</think>a1{EOS}{U}q2{A}</think>"


# ----------------------------------------------------------------------------- assistant
ASSISTANT_WITH_CALLS = {"role": "assistant", "content": "c", "reasoning_content": "r", "tool_calls": [
    call("f", {"s": "x y", "n": 3, "o": {"a": [1, "é", None, True]}}), call("g", {})]}
DSML_CALLS = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
              '<｜DSML｜parameter name="s" string="true">x y</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="o" string="false">{"a": [1, "é", null, true]}</｜DSML｜parameter>\n'
              '</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')


def test_assistant_reasoning_content_tool_calls():
    got = encode_messages([ASSISTANT_WITH_CALLS], "thinking", context=[user("q")])
    assert got == f"r</think>c{DSML_CALLS}{EOS}"
    assert encode_messages([ASSISTANT_WITH_CALLS], "chat", context=[user("q")]) == f"c{DSML_CALLS}{EOS}"
    # Before the last user message the reasoning is gone but the calls stay.
    assert encode_messages([ASSISTANT_WITH_CALLS, user("q2")], "thinking", context=[user("q")]) \
        == f"c{DSML_CALLS}{EOS}{U}q2{A}<think>"


def test_assistant_tool_calls_without_reasoning_open_with_think_end():
    msg = {"role": "assistant", "content": None, "tool_calls": [call("g", {})]}
    got = encode_messages([msg], "thinking", context=[user("q")])
    assert got == f'</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n' \
                  f"</｜DSML｜function_calls>{EOS}"


def test_thinking_reply_needs_reasoning_or_calls():
    with pytest.raises(ValueError, match=r"messages\[0\]: in thinking mode .* needs reasoning_content or tool_calls"):
        encode_messages([{"role": "assistant", "content": "a"}], "thinking", context=[user("q")])
    assert encode_messages([{"role": "assistant", "content": "a"}], "chat", context=[user("q")]) == f"a{EOS}"


# ----------------------------------------------------------------------------- tool results
TWO_CALLS = {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call("f", {}), call("g", {})]}
DSML_CALLS_FG = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
                 '<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>')
RESULTS = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "two\nlines"}]


@pytest.mark.parametrize("mode,think", [("thinking", "<think>"), ("chat", "</think>")])
def test_tool_results_grouped_after_the_calls(mode, think):
    got = encode_messages(RESULTS, mode, context=[user("q"), TWO_CALLS])
    assert got == ("\n\n<function_results>\n<result>1</result>\n<result>two\nlines</result>\n</function_results>"
                   f"\n\n{think}")


def test_tool_results_before_last_user_close_with_think_end():
    got = encode_messages([TWO_CALLS, *RESULTS, {"role": "assistant", "content": "done", "reasoning_content": "r2"},
                           user("next")], "thinking", context=[user("q")])
    assert got == (f"{DSML_CALLS_FG}{EOS}\n\n<function_results>\n<result>1</result>\n<result>two\nlines</result>\n"
                   f"</function_results>\n\n</think>done{EOS}{U}next{A}<think>")


# ----------------------------------------------------------------------------- thinking retention (paper §3.2.1)
def test_reasoning_kept_across_tool_calls_and_dropped_at_new_user():
    turn = [{"role": "system", "content": "S"}, user("q"),
            {"role": "assistant", "content": "", "reasoning_content": "r1", "tool_calls": [call("f", {"x": 1})]},
            {"role": "tool", "content": "out1"},
            {"role": "assistant", "content": "", "reasoning_content": "r2", "tool_calls": [call("g", {})]},
            {"role": "tool", "content": "out2"}]
    f_call = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
              '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
              '</｜DSML｜function_calls>')
    g_call = '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
    results = lambda out, think: f"\n\n<function_results>\n<result>{out}</result>\n</function_results>\n\n{think}"
    assert encode_messages(turn, "thinking") == (
        f"{BOS}S{U}q{A}<think>r1</think>{f_call}{EOS}{results('out1', '<think>')}"
        f"r2</think>{g_call}{EOS}{results('out2', '<think>')}")
    # The turn's answer, then a new user message: every reasoning of the turn is dropped, calls and results stay.
    later = turn + [{"role": "assistant", "content": "A", "reasoning_content": "r3"}, user("q2")]
    assert encode_messages(later, "thinking") == (
        f"{BOS}S{U}q{A}</think>{f_call}{EOS}{results('out1', '</think>')}"
        f"{g_call}{EOS}{results('out2', '</think>')}A{EOS}{U}q2{A}<think>")


# ----------------------------------------------------------------------------- golden prompts from DeepSeek's encoder
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_matches_deepseek_reference_encoder(case):
    conversation = GOLDEN["conversations"][case["conversation"]]
    got = encode_messages(conversation[case["start"]:case["stop"]], case["thinking_mode"],
                          context=conversation[:case["start"]], drop_thinking=case["drop_thinking"],
                          add_bos=case["add_bos"])
    assert got == case["expected"]


def test_golden_covers_the_rules():
    prompts = "".join(c["expected"] for c in GOLDEN["cases"])
    for piece in ["## Tools", "## Response Format:", "# The user's message is:", '<｜DSML｜invoke name="ping">\n\n',
                  'string="false">null<', 'string="false">1.5<', "</function_results>\n\n<think>",
                  "</function_results>\n\n</think>", "结果"]:
        assert piece in prompts, piece


# ----------------------------------------------------------------------------- malformed conversations
@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], r"messages\[0\]: role must be one of"),
    (["hello"], r"messages\[0\]: a message must be a dict"),
    ([{"role": "user", "content": None}], r"messages\[0\]: user content must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], r"user content must be a string, got list"),
    ([{"role": "developer", "content": ""}], r"developer content must be a non-empty string"),
    ([{"role": "user", "content": "q", "tools": [ECHO]}], r"tools is only rendered on system and developer"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]: a tool result must follow an assistant message"),
    ([user("q"), {"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}],
     r"messages\[2\]: a tool result must follow"),
    ([user("q"), TWO_CALLS, {"role": "tool", "content": "1"}],
     r"messages\[1\]: the assistant made 2 tool call\(s\) but 1"),
    ([user("q"), TWO_CALLS, *RESULTS, {"role": "tool", "content": "3"}], r"made 2 tool call\(s\) but 3"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}],
     r"tool_calls\[0\] \(f\) arguments are not"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}], r"must be a JSON object"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}], r"'arguments': JSON string"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [call('f"', {})]}], r"name 'f\"' must be"),
    ([user("q"), {"role": "assistant", "content": "", "tool_calls": [call("f", {"a\nb": 1})]}], r"argument key"),
    ([{"role": "system", "content": "S", "tools": [{"name": "echo"}]}], r"tools\[0\] must be an OpenAI tool"),
])
def test_malformed_conversations_raise(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, "chat")


def test_bad_mode_and_context_labels():
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        encode_messages([user("q")], "think")
    with pytest.raises(ValueError, match=r"context\[1\]: role must be one of"):
        encode_messages([user("q")], "chat", context=[user("a"), {"role": "bot", "content": "b"}])
