"""DeepSeek-V3.2 prompt encoding: OpenAI-shaped chat messages -> prompt text (spec §9).

For well-formed conversations the output is byte-identical to DeepSeek's reference
`encoding/encoding_dsv32.py` (`encode_messages`) of the official HF release:

- BOS only when there is no prior `context`.
- system: content, then `"\\n\\n"` + the tools block if `tools`, then `"\\n\\n"` + the response
  format block if `response_format`.
- user: `<｜User｜>{content}<｜Assistant｜>`; developer: the same with content
  `[\\n\\n tools][\\n\\n response format]\\n\\n# The user's message is: {content}`. Both end in `<think>`
  when they are the last user/developer message in thinking mode, else in `</think>`.
- assistant: `{reasoning}</think>` only in thinking mode after the last user message (such a
  message needs reasoning or tool calls), then content, then the DSML tool calls, then EOS.
- tool: results follow the assistant's EOS directly, matched by order to its calls, wrapped in
  `<function_results>` ... `</function_results>` and followed by `\\n\\n<think>` (thinking mode,
  after the last user message) or `\\n\\n</think>`.

Thinking retention (paper §3.2.1): reasoning is rendered only for assistant messages after the
last user/developer message, so the current turn's reasoning stays in the prompt across tool
calls and all of it disappears once a new user message arrives. `drop_thinking` exists for
parity with DeepSeek's signature and changes nothing: DeepSeek's renderer never writes earlier
reasoning either way. (Its drop_thinking=True path also deletes earlier `developer` messages
and then fails an internal assertion, spec §11.15; we keep them, as its drop_thinking=False
path does.) Re-encoding a conversation after appending a reply and its tool results gives the
previous prompt + the reply + the results, so a decode cache of the prompt stays valid.

Forged markup is rejected, not escaped: a ValueError names the message, the field and the
marker when any text (content, reasoning, tool names, argument keys and values, tool schemas,
response format) contains a special token (`<｜...｜>`: BOS, EOS, User, Assistant, ...), `<think>`,
`</think>` or the `｜DSML｜` marker, or when a tool result contains `<function_results>`,
`</function_results>`, `<result>` or `</result>`. Rejection keeps the format exactly DeepSeek's
(an escape would change text the model reads) and cannot be undone by a crafted input. The
tokenizer must do its part: it has to turn this text into ordinary tokens, never special-token
ids (HF: encode untrusted pieces with `split_special_tokens=True`, or trust only the encoder's
markup). Malformed conversations (unknown roles, non-string content, tool results without a
matching call, a partial set of results, bad `arguments` JSON) also raise ValueError.
"""

import json
from collections.abc import Sequence
from typing import Any

from deepseek_jax.chat.markup import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    FUNCTION_CALLS_CLOSE,
    FUNCTION_CALLS_OPEN,
    FUNCTION_RESULTS_CLOSE,
    FUNCTION_RESULTS_OPEN,
    INVOKE_CLOSE,
    PARAMETER_CLOSE,
    RESPONSE_FORMAT_TEMPLATE,
    RESULT_CLOSE,
    RESULT_OPEN,
    THINK_END,
    THINK_START,
    TOOLS_SYSTEM_TEMPLATE,
    USER,
    find_reserved,
)

Message = dict[str, Any]
THINKING_MODES = ("chat", "thinking")
ROLES = ("system", "user", "developer", "assistant", "tool")


def to_json(value: Any) -> str:
    """JSON as DeepSeek's encoder writes it: default separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def encode_messages(messages: Sequence[Message], thinking_mode: str, *, context: Sequence[Message] | None = None,
                    drop_thinking: bool = True, add_bos: bool = True) -> str:
    """Prompt text for `messages`, continuing `context` (earlier messages already in the prompt).

    Only `messages` are rendered; `context` decides BOS, the last user message and which
    assistant call each tool result answers. End the messages with a user/developer message
    (or tool results) to get a generation prompt; the model's completion is then parsed by
    `parse_completion`.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if not isinstance(drop_thinking, bool):
        raise ValueError(f"drop_thinking must be a bool, got {drop_thinking!r}")
    context = list(context or [])
    conversation = context + list(messages)
    label = lambda i: f"context[{i}]" if i < len(context) else f"messages[{i - len(context)}]"
    for i, msg in enumerate(conversation):
        _check_message(label(i), msg)
    owners = _tool_result_owners(conversation, label)
    last_user = max((i for i, m in enumerate(conversation) if m["role"] in ("user", "developer")), default=-1)
    thinking = thinking_mode == "thinking"

    parts = [BOS] if add_bos and not context else []
    for i in range(len(context), len(conversation)):
        msg, role = conversation[i], conversation[i]["role"]
        if role == "system":
            parts.append((msg.get("content") or "") + _instructions(msg))
        elif role in ("user", "developer"):
            content = msg["content"]
            if role == "developer":
                content = _instructions(msg) + "\n\n# The user's message is: " + content
            think = THINK_START if thinking and i == last_user else THINK_END
            parts.append(f"{USER}{content}{ASSISTANT}{think}")
        elif role == "assistant":
            if thinking and i > last_user and not (msg.get("reasoning_content") or msg.get("tool_calls")):
                raise ValueError(f"{label(i)}: in thinking mode an assistant message after the last user message "
                                 "needs reasoning_content or tool_calls")
            reasoning = (msg.get("reasoning_content") or "") + THINK_END if thinking and i > last_user else ""
            parts.append(reasoning + (msg.get("content") or "") + _tool_calls_dsml(msg.get("tool_calls")) + EOS)
        else:
            order, n_calls = owners[i]
            opening = "\n\n" + FUNCTION_RESULTS_OPEN if order == 1 else ""
            closing = ""
            if order == n_calls:
                think = THINK_START if thinking and i > last_user else THINK_END
                closing = f"\n{FUNCTION_RESULTS_CLOSE}\n\n{think}"
            parts.append(f"{opening}\n{RESULT_OPEN}{msg['content']}{RESULT_CLOSE}{closing}")
    return "".join(parts)


def _instructions(msg: Message) -> str:
    """The tools block and the response-format block of a system or developer message."""
    text = ""
    if msg.get("tools"):
        schemas = "\n".join(to_json(tool["function"]) for tool in msg["tools"])
        text += "\n\n" + TOOLS_SYSTEM_TEMPLATE.format(tool_schemas=schemas)
    if msg.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(msg["response_format"]))
    return text


def _tool_calls_dsml(tool_calls: list[Message] | None) -> str:
    """`\\n\\n<｜DSML｜function_calls>` block: strings raw with string="true", everything else JSON."""
    if not tool_calls:
        return ""
    invokes = []
    for call in tool_calls:
        params = [f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
                  f"{value if isinstance(value, str) else to_json(value)}{PARAMETER_CLOSE}"
                  for key, value in json.loads(call["function"]["arguments"]).items()]
        invokes.append(f'<{DSML}invoke name="{call["function"]["name"]}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}")
    return f"\n\n{FUNCTION_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{FUNCTION_CALLS_CLOSE}"


def _check_message(where: str, msg: Any) -> None:
    """Shape and reserved-marker checks of one message; raises ValueError naming `where`."""
    if not isinstance(msg, dict):
        raise ValueError(f"{where}: a message must be a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {ROLES}, got {role!r}")
    content = msg.get("content")
    if role in ("user", "tool") and not isinstance(content, str):
        raise ValueError(f"{where}: {role} content must be a string, got {type(content).__name__}")
    if role == "developer" and not (isinstance(content, str) and content):
        raise ValueError(f"{where}: developer content must be a non-empty string, got {content!r}")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string or None, got {type(content).__name__}")
    texts = {"content": content or ""}

    for key in ("tools", "response_format"):
        if msg.get(key) and role not in ("system", "developer"):
            raise ValueError(f"{where}: {key} is only rendered on system and developer messages, not {role}")
    if msg.get("tools"):
        if not isinstance(msg["tools"], list):
            raise ValueError(f"{where}: tools must be a list, got {type(msg['tools']).__name__}")
        for j, tool in enumerate(msg["tools"]):
            if not (isinstance(tool, dict) and isinstance(tool.get("function"), dict)):
                raise ValueError(f"{where}: tools[{j}] must be an OpenAI tool {{'type': 'function', 'function': "
                                 f"{{...}}}}, got {tool!r}")
            texts[f"tools[{j}]"] = to_json(tool["function"])
    if msg.get("response_format"):
        texts["response_format"] = to_json(msg["response_format"])

    if role == "assistant":
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{where}: reasoning_content must be a string or None, got {type(reasoning).__name__}")
        texts["reasoning_content"] = reasoning or ""
        tool_calls = msg.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise ValueError(f"{where}: tool_calls must be a list, got {type(tool_calls).__name__}")
        for j, call in enumerate(tool_calls):
            texts.update(_check_tool_call(where, f"tool_calls[{j}]", call))
    elif msg.get("tool_calls"):
        raise ValueError(f"{where}: only assistant messages carry tool_calls, not {role}")

    for field, text in texts.items():
        marker = find_reserved(text, tool_result=role == "tool" and field == "content")
        if marker is not None:
            raise ValueError(f"{where} ({role}): {field} contains the reserved marker {marker!r}; text from users, "
                             "tools or clients may not contain the chat format's special tokens or markup")


def _check_tool_call(where: str, field: str, call: Any) -> dict[str, str]:
    """Shape checks of one OpenAI tool call; returns its texts (name, keys, values) by field name."""
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)):
        raise ValueError(f"{where}: {field} must be {{'function': {{'name': str, 'arguments': JSON string}}}}, "
                         f"got {call!r}")
    name, raw = function["name"], function["arguments"]
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {field} ({name}) arguments are not valid JSON ({e}): {raw!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: {field} ({name}) arguments must be a JSON object, got {raw!r}")
    # Names and keys sit in a quoted attribute on one line.
    for what, text in [("name", name), *(("argument key", key) for key in arguments)]:
        if not text or '"' in text or "\n" in text:
            raise ValueError(f"{where}: {field} {what} {text!r} must be non-empty, without '\"' or newlines")
    texts = {f"{field} name": name}
    for key, value in arguments.items():
        texts[f"{field} argument {key!r}"] = key + "\n" + (value if isinstance(value, str) else to_json(value))
    return texts


def _tool_result_owners(conversation: list[Message], label) -> dict[int, tuple[int, int]]:
    """For each tool message: (its 1-based order among the results, the number of calls it answers)."""
    owners = {}
    i = 0
    while i < len(conversation):
        if conversation[i]["role"] != "tool":
            i += 1
            continue
        start = i
        while i < len(conversation) and conversation[i]["role"] == "tool":
            i += 1
        caller = conversation[start - 1] if start else None
        n_calls = len(caller.get("tool_calls") or []) if caller and caller["role"] == "assistant" else 0
        if n_calls == 0:
            raise ValueError(f"{label(start)}: a tool result must follow an assistant message with tool_calls")
        if i - start != n_calls:
            raise ValueError(f"{label(start - 1)}: the assistant made {n_calls} tool call(s) but {i - start} tool "
                             "result(s) follow; give one result per call, in call order")
        owners.update({start + k: (k + 1, n_calls) for k in range(n_calls)})
    return owners
