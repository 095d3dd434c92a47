"""Sample from a checkpoint: one prompt, an interactive chat, or a tool-calling loop.

    python -m experiments.sample --checkpoint=DIR --prompt="The capital of France is"
    python -m experiments.sample --checkpoint=DIR --chat [--thinking]           # interactive
    python -m experiments.sample --checkpoint=DIR --chat --tools --thinking \\
        --prompt="What is 17 * 23, and what time is it in Tokyo?"

DIR is an HF / DeepSeek safetensors checkpoint (config.json) or an Orbax inference export
(model_config.json); the tokenizer is DIR/tokenizer.json unless --tokenizer says otherwise.
Without --chat the prompt is raw text; with it, messages go through the V3.2 chat format
(`deepseek_jax.chat`), and --tools lets the model call the example tools (calculator, clock,
lookup): each tool round re-encodes the conversation, so the turn's reasoning is kept across
the calls and printed with each step.
"""

import datetime
import os

from absl import app, flags

from deepseek_jax import generate, load_hf
from deepseek_jax.chat import CompletionError, encode_messages, parse_completion
from deepseek_jax.chat.example_tools import example_tools
from deepseek_jax.chat.tool_loop import call_tool
from deepseek_jax.checkpoint.orbax import load_inference

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF safetensors or Orbax inference directory", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: in the checkpoint directory)")
_PROMPT = flags.DEFINE_string("prompt", None, "raw text, or with --chat the first user message")
_CHAT = flags.DEFINE_bool("chat", False, "use the V3.2 chat format (interactive when --prompt is not given)")
_THINKING = flags.DEFINE_bool("thinking", False, "chat in thinking mode")
_TOOLS = flags.DEFINE_bool("tools", False, "chat: offer the example tools and run the tool-calling loop")
_MAX_STEPS = flags.DEFINE_integer("max_tool_steps", 4, "chat: completions per user message, tool rounds included")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "new tokens per completion")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling")
_TOP_K = flags.DEFINE_integer("top_k", 0, "top-k sampling (0 = off)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "MTP speculative decoding")


def load_checkpoint(directory):
    if os.path.isfile(os.path.join(directory, "model_config.json")):
        return load_inference(directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return load_hf(directory, progress=True)
    raise ValueError(f"sample: {directory} holds neither config.json (HF) nor model_config.json (Orbax export)")


def load_tokenizer(path):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise ValueError(f"sample: no tokenizer at {path} (pass --tokenizer=.../tokenizer.json)")
    return Tokenizer.from_file(path)


class Completer:
    """Text in, text out through `generate`; special tokens are kept in the output (the chat
    parser needs EOS and the DSML markup)."""

    def __init__(self, params, cfg, tokenizer, **options):
        self.params, self.cfg, self.tokenizer, self.options = params, cfg, tokenizer, options
        self.calls = 0

    def __call__(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if any(i >= self.cfg.vocab_size for i in ids):
            raise ValueError(f"sample: the tokenizer's ids exceed the model's vocab_size {self.cfg.vocab_size}")
        out = generate(self.params, self.cfg, [ids], seed=self.options["seed"] + self.calls,
                       **{k: v for k, v in self.options.items() if k != "seed"})[0]
        self.calls += 1
        return self.tokenizer.decode(out.tokens.tolist(), skip_special_tokens=False)


def chat_turn(complete, history, tools, mode, max_steps, show=print):
    """One user turn: completions (and tool rounds) until a reply without tool calls."""
    for _ in range(max_steps):
        text = complete(encode_messages(history, mode))
        try:
            reply = parse_completion(text, mode)
        except CompletionError as e:
            show(f"[unparseable completion: {e}]\n{text}")
            return history
        history.append(reply)
        if reply["reasoning_content"]:
            show(f"[thinking] {reply['reasoning_content']}")
        if reply["content"]:
            show(f"[assistant] {reply['content']}")
        if not reply["tool_calls"]:
            return history
        for call in reply["tool_calls"]:
            result = call_tool(tools, call)
            show(f"[tool {call['function']['name']}({call['function']['arguments']})] -> {result}")
            history.append({"role": "tool", "content": result})
    return history


def main(argv):
    del argv
    cfg, params = load_checkpoint(_CHECKPOINT.value)
    tokenizer = load_tokenizer(_TOKENIZER.value or os.path.join(_CHECKPOINT.value, "tokenizer.json"))
    complete = Completer(params, cfg, tokenizer, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                         top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value, speculative=_SPECULATIVE.value)
    if not _CHAT.value:
        if _PROMPT.value is None:
            raise app.UsageError("--prompt is required without --chat")
        print(_PROMPT.value + complete(_PROMPT.value))
        return
    mode = "thinking" if _THINKING.value else "chat"
    tools, schemas = example_tools(datetime.datetime.now(datetime.timezone.utc),
                                   {"deepseek-v3.2": "open weights, MIT license"}) if _TOOLS.value else ({}, [])
    history = [{"role": "system", "content": "You are a helpful assistant.", **({"tools": schemas} if schemas else {})}]
    prompts = [_PROMPT.value] if _PROMPT.value is not None else iter(lambda: input("user> "), "")
    for text in prompts:
        history.append({"role": "user", "content": text})
        history = chat_turn(complete, history, tools, mode, _MAX_STEPS.value)


if __name__ == "__main__":
    app.run(main)
