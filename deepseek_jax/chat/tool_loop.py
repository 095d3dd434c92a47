"""The tool-calling loop: encode, complete, parse, run the called tools, repeat (spec §9).

Each step re-encodes the whole conversation with `encode_messages`, so the thinking-retention
rule holds by construction: the reasoning of the current turn's replies stays in the prompt
across tool calls, and is dropped once the caller appends a new user message. Each step's
prompt is the previous prompt + the parsed reply (re-encoded) + the tool results, so a
generator may keep its cache between steps.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deepseek_jax.chat.encode import Message, encode_messages
from deepseek_jax.chat.markup import find_reserved
from deepseek_jax.chat.parse import parse_completion


def run_tool_loop(complete: Callable[[str], str], messages: Sequence[Message], tools: Mapping[str, Callable[..., Any]],
                  *, thinking_mode: str, max_steps: int) -> list[Message]:
    """Run the conversation until the model answers without tool calls, or for `max_steps` completions.

    `complete(prompt)` returns the model's text after the prompt, ending with EOS (or with the
    DSML block); a malformed completion raises `CompletionError`. `tools` maps tool names to
    callables taking the call's arguments as keywords; their schemas belong on the system (or
    developer) message. Returns `messages` + the new assistant and tool messages; it ends with
    tool messages when `max_steps` ran out first.
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    for name, fn in tools.items():
        if not callable(fn):
            raise ValueError(f"tool {name!r} is not callable: {fn!r}")
    history = list(messages)
    for _ in range(max_steps):
        reply = parse_completion(complete(encode_messages(history, thinking_mode)), thinking_mode)
        history.append(reply)
        if not reply["tool_calls"]:
            break
        history.extend({"role": "tool", "content": call_tool(tools, call)} for call in reply["tool_calls"])
    return history


def call_tool(tools: Mapping[str, Callable[..., Any]], call: Message) -> str:
    """The result text of one OpenAI-shaped tool call: the tool's value (strings as they are,
    the rest as JSON) or, when the tool is unknown or fails, an error text for the model to read."""
    name = call["function"]["name"]
    if name not in tools:
        return f"error: unknown tool {name!r}; available tools: {sorted(tools)}"
    try:
        result = tools[name](**json.loads(call["function"]["arguments"]))
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    except Exception as e:  # noqa: BLE001 -- any tool failure becomes a result for the model, not a crash
        text = f"error: {type(e).__name__}: {e}"
    if find_reserved(text, tool_result=True) is not None:
        return f"error: the result of {name!r} contained chat-format markup and was withheld"
    return text
