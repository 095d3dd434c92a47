"""The DeepSeek-V3.2 chat format (spec §9): message encoding, completion parsing, the tool-calling loop.

Pure Python; nothing here needs JAX.
"""

from deepseek_jax.chat.encode import encode_messages
from deepseek_jax.chat.parse import CompletionError, parse_completion
from deepseek_jax.chat.tool_loop import call_tool, run_tool_loop

__all__ = ["CompletionError", "call_tool", "encode_messages", "parse_completion", "run_tool_loop"]
