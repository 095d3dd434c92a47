"""Tiny-preset demo: init a DeepSeek-V3.2-style model, run a forward, greedily continue a prompt.

    python -m experiments.demo [--preset=tiny] [--prompt_len=24] [--new_tokens=8]

The prompt is longer than the preset's index_topk, so the DSA sparse path (indexer top-k +
absorbed sparse MLA) runs. Decoding recomputes the whole sequence each step (the cached decode
loop is the inference issue's work).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deepseek_jax import ModelConfig, Transformer, forward
from deepseek_jax.attention import resolve_mode

_PRESET = flags.DEFINE_string("preset", "tiny", "ModelConfig preset")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 24, "prompt length (tokens)")
_NEW = flags.DEFINE_integer("new_tokens", 8, "tokens to generate greedily")
_SEED = flags.DEFINE_integer("seed", 0, "init / prompt seed")


def main(argv):
    del argv
    cfg = ModelConfig.preset(_PRESET.value)
    rng = np.random.default_rng(_SEED.value)
    prompt = rng.integers(2, cfg.vocab_size, size=(1, _PROMPT_LEN.value)).astype(np.int32)
    print(f"devices: {jax.devices()}")
    params = Transformer(cfg).init(jax.random.PRNGKey(_SEED.value), jnp.asarray(prompt))["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"preset={_PRESET.value} params={n_params / 1e6:.2f}M layers={cfg.num_hidden_layers} "
          f"experts={cfg.n_routed_experts} index_topk={cfg.index_topk}")

    fwd = jax.jit(forward, static_argnames=("cfg", "attention"))
    # One fixed shape (prompt + new tokens) so the forward compiles once; causality makes the
    # not-yet-generated tail irrelevant to the logits read at position `pos - 1`.
    total = prompt.shape[1] + _NEW.value
    tokens = np.zeros((1, total), np.int32)
    tokens[:, :prompt.shape[1]] = prompt
    start = time.perf_counter()
    for pos in range(prompt.shape[1], total):
        logits = fwd(params, jnp.asarray(tokens), cfg)
        tokens[:, pos] = np.asarray(jnp.argmax(logits[:, pos - 1], -1))
    elapsed = time.perf_counter() - start
    print(f"forward logits: {logits.shape} {logits.dtype}; attention path at T={total}: "
          f"{resolve_mode('auto', total, cfg)}")
    print(f"prompt:    {prompt[0].tolist()}")
    print(f"generated: {tokens[0, prompt.shape[1]:].tolist()} ({elapsed:.1f}s incl. one compile)")


if __name__ == "__main__":
    app.run(main)
