"""DeepSeek-V3.2 completion parsing: the model's reply text -> an OpenAI-shaped assistant message (spec §9).

The inverse of how `encode_messages` renders an assistant message: in thinking mode the reasoning
runs up to `</think>`; then the content runs up to EOS or to the `\\n\\n<｜DSML｜function_calls>`
block; then the DSML invokes, each `<｜DSML｜invoke name="N">` with one
`<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>` per line; then EOS.
string="true" values are taken raw, the others must be JSON. The result has the keys of
DeepSeek's `parse_message_from_completion_text`: role, content, reasoning_content ("" in chat
mode) and tool_calls (`{"type": "function", "function": {"name", "arguments"}}`, arguments a
JSON object string written as DeepSeek writes it: string values JSON-quoted, others verbatim).

Malformed text raises CompletionError (a ValueError) saying what was expected and where:
reasoning without `</think>`, content without EOS (a truncated completion), an unterminated
or ill-formed DSML block, a parameter that is not JSON, a repeated parameter, text after the
calls, or a reserved marker (special token, think tag, DSML) inside reasoning, content, names
or values, which `encode_messages` would refuse to re-encode. EOS after the DSML block may be
missing (the closing tag already ends the reply), as in DeepSeek's parser.
"""

import json
import re

from deepseek_jax.chat.encode import THINKING_MODES, to_json
from deepseek_jax.chat.markup import (
    DSML,
    EOS,
    FUNCTION_CALLS_CLOSE,
    FUNCTION_CALLS_OPEN,
    THINK_END,
    find_reserved,
)

_CALLS_START = f"\n\n{FUNCTION_CALLS_OPEN}\n"
_INVOKE = re.compile(f'<{DSML}invoke name="([^"\n]*)">\n(.*?)\n</{DSML}invoke>', re.DOTALL)
_PARAMETER = re.compile(f'<{DSML}parameter name="([^"\n]*)" string="(true|false)">(.*?)</{DSML}parameter>',
                        re.DOTALL)


class CompletionError(ValueError):
    """A completion that is not a well-formed DeepSeek-V3.2 assistant reply."""


def parse_completion(text: str, thinking_mode: str) -> dict:
    """The assistant message that `text` (the model's output after the prompt) encodes."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    pos, reasoning = 0, ""
    if thinking_mode == "thinking":
        end = text.find(THINK_END)
        if end < 0:
            raise CompletionError(f"thinking mode: the reasoning is not closed by {THINK_END!r}")
        reasoning, pos = text[:end], end + len(THINK_END)

    eos, calls = text.find(EOS, pos), text.find(_CALLS_START, pos)
    tool_calls = []
    if calls >= 0 and (eos < 0 or calls < eos):
        content = text[pos:calls]
        tool_calls, pos = _parse_tool_calls(text, calls + len(_CALLS_START))
        if text[pos:] not in ("", EOS):
            raise CompletionError(f"unexpected text after {FUNCTION_CALLS_CLOSE!r}: {text[pos:pos + 80]!r}")
    elif eos >= 0:
        content = text[pos:eos]
        if eos + len(EOS) != len(text):
            raise CompletionError(f"unexpected text after EOS: {text[eos + len(EOS):][:80]!r}")
    else:
        raise CompletionError("the content is not terminated by EOS or a DSML function_calls block "
                              "(a truncated completion?)")

    for field, value in (("reasoning_content", reasoning), ("content", content)):
        marker = find_reserved(value)
        if marker is not None:
            raise CompletionError(f"{field} contains the reserved marker {marker!r}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """The invokes from `pos` (just after `<｜DSML｜function_calls>\\n`) and the position after the block."""
    if text.find(FUNCTION_CALLS_CLOSE, pos) < 0:
        raise CompletionError(f"unterminated DSML block: no {FUNCTION_CALLS_CLOSE!r}")
    tool_calls = []
    while True:
        invoke = _INVOKE.match(text, pos)
        if invoke is None:
            raise CompletionError(f"malformed DSML at offset {pos}: expected "
                                  f'\'<{DSML}invoke name="...">\\n\', got {text[pos:pos + 80]!r}')
        name, body = invoke.groups()
        tool_calls.append({"type": "function", "function": {"name": name, "arguments": _parse_arguments(name, body)}})
        pos = invoke.end()
        if text.startswith("\n" + FUNCTION_CALLS_CLOSE, pos):
            return tool_calls, pos + 1 + len(FUNCTION_CALLS_CLOSE)
        if not text.startswith("\n", pos):
            raise CompletionError(f"malformed DSML at offset {pos}: expected a newline and another invoke or "
                                  f"{FUNCTION_CALLS_CLOSE!r}, got {text[pos:pos + 80]!r}")
        pos += 1


def _parse_arguments(name: str, body: str) -> str:
    """The JSON arguments string of one invoke's parameter lines."""
    if find_reserved(name) is not None or not name:
        raise CompletionError(f"invalid tool name {name!r}")
    pieces, seen, pos = [], set(), 0
    while pos < len(body):
        param = _PARAMETER.match(body, pos)
        if param is None:
            raise CompletionError(f"tool {name!r}: malformed parameter, got {body[pos:pos + 80]!r}")
        key, is_string, value = param.groups()
        if key in seen:
            raise CompletionError(f"tool {name!r}: parameter {key!r} given twice")
        rendered = value
        if is_string == "false":
            try:
                rendered += "\n" + to_json(json.loads(value))  # how encode_messages will write it back
            except json.JSONDecodeError as e:
                raise CompletionError(f'tool {name!r}: parameter {key!r} has string="false" but its value is not '
                                      f"JSON ({e}): {value!r}") from None
        marker = find_reserved(key + "\n" + rendered)
        if not key or marker is not None:
            raise CompletionError(f"tool {name!r}: parameter {key!r} has an empty name or a reserved marker {marker!r}")
        seen.add(key)
        pieces.append(f"{to_json(key)}: {to_json(value) if is_string == 'true' else value}")
        pos = param.end()
        if pos < len(body):
            if body[pos] != "\n" or pos + 1 == len(body):
                raise CompletionError(f"tool {name!r}: expected a newline and another parameter after {key!r}, "
                                      f"got {body[pos:pos + 80]!r}")
            pos += 1
    return "{" + ", ".join(pieces) + "}"
