"""The fixed strings of the DeepSeek-V3.2 chat format (spec §9) and the check that keeps them out of text.

Special tokens use fullwidth bars (U+FF5C) and U+2581 in the sentence tokens. Tool calls are
written in DSML, XML-like tags whose names start with the `｜DSML｜` marker.

TOOLS_SYSTEM_TEMPLATE is the variant with blank lines between paragraphs: the one in
`encoding/encoding_dsv32.py` of the official HF release deepseek-ai/DeepSeek-V3.2 (as copied into
the transformers tree, `models/deepseek_v32/deepseek_files/`), which reproduces that release's own
golden `encoding/test_output.txt`. The sglang / vLLM / TensorRT-LLM copies drop the blank lines
and do not match that golden output (spec §9).
"""

import re

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

FUNCTION_CALLS_OPEN = f"<{DSML}function_calls>"
FUNCTION_CALLS_CLOSE = f"</{DSML}function_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_CLOSE = f"</{DSML}parameter>"
FUNCTION_RESULTS_OPEN = "<function_results>"
FUNCTION_RESULTS_CLOSE = "</function_results>"
RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"

TOOLS_SYSTEM_TEMPLATE = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{FUNCTION_CALLS_OPEN}" block like the following as part of your reply to the user:
{FUNCTION_CALLS_OPEN}
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
<{DSML}invoke name="$FUNCTION_NAME2">
...
{INVOKE_CLOSE}
{FUNCTION_CALLS_CLOSE}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

{FUNCTION_CALLS_OPEN}
...
{FUNCTION_CALLS_CLOSE}

{FUNCTION_RESULTS_OPEN}
...
{FUNCTION_RESULTS_CLOSE}

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
{{tool_schemas}}
</functions>
"""  # noqa: E501  (the exact lines DeepSeek-V3.2 was trained on)

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

# Any `<｜...｜>` string is a special token of DeepSeek's tokenizer (BOS, EOS, User, Assistant, the
# FIM and V3 tool-call tokens, the place holders); with the think tags and the DSML marker these
# are the strings that delimit roles, reasoning and tool calls.
_SPECIAL = re.compile("|".join([r"<｜[^｜]*｜>", re.escape(THINK_START), re.escape(THINK_END), re.escape(DSML)]))
# Inside a tool result the result tags delimit too: they would let one result close its own block.
_RESULT_TAGS = re.compile("|".join(re.escape(t) for t in (FUNCTION_RESULTS_OPEN, FUNCTION_RESULTS_CLOSE,
                                                           RESULT_OPEN, RESULT_CLOSE)))


def find_reserved(text: str, *, tool_result: bool = False) -> str | None:
    """The first reserved marker in `text` (special token, think tag, DSML marker and, for a tool
    result, the function_results / result tags), or None."""
    found = [m for m in (_SPECIAL.search(text), _RESULT_TAGS.search(text) if tool_result else None) if m]
    return min(found, key=lambda m: m.start()).group() if found else None
