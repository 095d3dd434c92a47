"""Benchmarks cached decoding: step time against context length, sparse (DSA) vs dense, and
tokens/s of `generate` against transformers' `DeepseekV32ForCausalLM.generate`.

1. Decode step vs context. A model of --preset with the attention dims overridden by flags
   (defaults: 4 layers, 32 heads, latent 256, 16 indexer heads: per cached key, dense attention
   costs ~17x the indexer's scoring, as in the 671B model; 8 experts, because the dropless
   `ragged_dot` dispatch costs ~14 ms per MoE layer and token on a CPU at 64 experts, which
   would bury the attention curve under a constant) decodes one token per sequence with
   C tokens already cached, for each C in --contexts. The cache is filled with random rows
   (the step's cost does not depend on their values; a real prefill of 32K tokens would take
   most of the run on a CPU) and its length is C + the steps timed, rounded up to 256.
     sparse: `decode_step(attention="auto")` - the indexer scores all C keys, attention reads
             only its --topk rows: the attention part stays flat once C > topk.
     dense : `decode_step(attention="dense")` - absorbed attention over all C cached rows
             (V3.1-style MLA decode); grows linearly with C.
   Each (C, mode) is compiled by one untimed step, warmed up --warmup more, then --steps steps
   are timed one by one (`block_until_ready`); the median is reported.

2. Tokens/s against transformers. The --hf_preset model (default "tiny", float32; transformers
   ignores its MTP layer) gets random weights, is written with `save_hf` and loaded by
   transformers (eager attention, CPU torch with --torch_threads threads: on a shared 2-core
   machine two OpenMP threads made a tiny forward take ~1 s instead of ~10 ms). Both continue the same --hf_batch prompts of --hf_prompt_len tokens greedily by
   --hf_new_tokens tokens (no EOS); each runs once to warm up (our compile) and is then timed
   --hf_repeats times (best run). tokens/s = batch · new tokens / wall time, prefill included.
   The table also reports how many greedy tokens the two agree on (they should all agree), and
   ours with MTP speculative decoding (`generate(speculative=True)`) with its acceptance rate:
   with random weights the MTP layer's drafts are near-random, so it is low here; the number
   says what the machinery costs, not what a trained MTP layer gains.

    python -m experiments.bench_decode [--contexts=1024,...,32768] [--steps=8] [--topk=512]
        [--hf_new_tokens=64] [--out=bench_decode.json] [--plot=bench_decode.png]

Writes JSON (--out) and, when matplotlib is importable, a PNG of step time vs context (--plot).
Absolute times on shared CPUs are noisy; the sparse/dense ratio and the slopes (ms per 1K
context, least squares) are what the run is for.
"""

import json
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deepseek_jax import ModelConfig, Transformer, generate, load_hf, save_hf
from deepseek_jax.cache import init_cache
from deepseek_jax.generate import decode_step

_PRESET = flags.DEFINE_string("preset", "small", "ModelConfig preset of the decode-vs-context model")
_LAYERS = flags.DEFINE_integer("layers", 4, "num_hidden_layers (the first is dense)")
_HEADS = flags.DEFINE_integer("heads", 32, "num_attention_heads")
_KV_RANK = flags.DEFINE_integer("kv_lora_rank", 256, "kv_lora_rank (latent C)")
_INDEX_HEADS = flags.DEFINE_integer("index_heads", 16, "index_n_heads")
_EXPERTS = flags.DEFINE_integer("experts", 8, "n_routed_experts (n_group 4, topk_group 2, 2 per token)")
_ROPE_DIM = flags.DEFINE_integer("rope_dim", None, "qk_rope_head_dim (default: the preset's)")
_INDEX_DIM = flags.DEFINE_integer("index_dim", None, "index_head_dim (default: the preset's)")
_TOPK = flags.DEFINE_integer("topk", 512, "index_topk")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and param dtype")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768"], "cached tokens C")
_BATCH = flags.DEFINE_integer("batch", 1, "sequences per decode step")
_STEPS = flags.DEFINE_integer("steps", 8, "timed decode steps per (context, mode)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed decode steps after the compiling one")
_HF_PRESET = flags.DEFINE_string("hf_preset", "tiny", "preset of the transformers comparison ('' skips it)")
_HF_BATCH = flags.DEFINE_integer("hf_batch", 1, "prompts in the transformers comparison")
_HF_PROMPT = flags.DEFINE_integer("hf_prompt_len", 32, "prompt tokens in the transformers comparison")
_HF_NEW = flags.DEFINE_integer("hf_new_tokens", 64, "new tokens in the transformers comparison")
_HF_REPEATS = flags.DEFINE_integer("hf_repeats", 2, "timed runs per implementation (best reported)")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 1, "torch.set_num_threads for transformers")
_OUT = flags.DEFINE_string("out", "bench_decode.json", "JSON output path")
_PLOT = flags.DEFINE_string("plot", "bench_decode.png", "PNG output path (needs matplotlib; '' skips)")
_SEED = flags.DEFINE_integer("seed", 0, "params / input seed")

_MODES = {"sparse": "auto", "dense": "dense"}


def _init_params(cfg, seed):
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    return nn.meta.unbox(params)


def _filled_cache(cfg, batch, context, max_len, key):
    """A cache of max_len rows holding `context` random rows per sequence (values only matter for
    timing); lengths = context."""
    cache = init_cache(cfg, batch, max_len)
    leaves, tree = jax.tree.flatten(cache.layers)
    keys = jax.random.split(key, len(leaves))
    leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
    return cache._replace(layers=jax.tree.unflatten(tree, leaves), lengths=jnp.full((batch,), context, jnp.int32))


def _time_decode(params, cfg, context, mode, key):
    """Median ms of one decode step with `context` tokens cached."""
    steps, batch = _STEPS.value, _BATCH.value
    warmup = 1 + _WARMUP.value  # the first step compiles: never timed, whatever --warmup says
    max_len = -(-(context + steps + warmup) // 256) * 256
    cache = _filled_cache(cfg, batch, context, max_len, key)
    tokens = jax.random.randint(key, (batch,), 0, cfg.vocab_size, jnp.int32)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits, cache, _ = decode_step(params, cfg, cache, tokens, attention=mode)
        jax.block_until_ready(logits)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _slope_ms_per_1k(contexts, ms):
    return float(np.polyfit(np.asarray(contexts) / 1024, ms, 1)[0]) if len(contexts) > 1 else None


def bench_contexts():
    dims = {name: flag.value for name, flag in (("qk_rope_head_dim", _ROPE_DIM), ("index_head_dim", _INDEX_DIM))
            if flag.value is not None}
    cfg = ModelConfig.preset(_PRESET.value, num_hidden_layers=_LAYERS.value, first_k_dense_replace=1,
                             num_attention_heads=_HEADS.value, kv_lora_rank=_KV_RANK.value,
                             index_n_heads=_INDEX_HEADS.value, index_topk=_TOPK.value, num_nextn_predict_layers=0,
                             n_routed_experts=_EXPERTS.value, n_group=4, topk_group=2, num_experts_per_tok=2,
                             dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                             max_position_embeddings=max(int(c) for c in _CONTEXTS.value) + 1024, **dims)
    per_key_dense = cfg.num_attention_heads * (2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.kv_lora_rank)
    per_key_index = cfg.index_n_heads * 2 * cfg.index_head_dim
    print(f"decode vs context: preset={_PRESET.value} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads} "
          f"C+R={cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} index heads={cfg.index_n_heads}x{cfg.index_head_dim} "
          f"topk={cfg.index_topk} dtype={cfg.dtype} batch={_BATCH.value}; FLOPs per cached key per layer: "
          f"dense attention {per_key_dense}, indexer {per_key_index}", flush=True)
    params = _init_params(cfg, _SEED.value)
    row_fmt = "{:>8} {:>10} {:>10} {:>13}"
    print(row_fmt.format("context", "sparse_ms", "dense_ms", "dense/sparse"), flush=True)
    rows = []
    for context in (int(c) for c in _CONTEXTS.value):
        key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), context)
        ms = {name: _time_decode(params, cfg, context, mode, key) for name, mode in _MODES.items()}
        rows.append({"context": context, "sparse_ms": ms["sparse"], "dense_ms": ms["dense"],
                     "ratio": ms["dense"] / ms["sparse"]})
        print(row_fmt.format(context, f"{ms['sparse']:.2f}", f"{ms['dense']:.2f}", f"{rows[-1]['ratio']:.2f}"),
              flush=True)
    contexts = [r["context"] for r in rows]
    slopes = {name: _slope_ms_per_1k(contexts, [r[f"{name}_ms"] for r in rows]) for name in _MODES}
    print("slope (ms per 1K cached tokens): " + "  ".join(
        f"{name}={'n/a' if s is None else f'{s:.3f}'}" for name, s in slopes.items()), flush=True)
    dims = {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "kv_lora_rank",
                                         "qk_rope_head_dim", "index_n_heads", "index_head_dim", "index_topk",
                                         "n_routed_experts", "vocab_size", "dtype")}
    return {"preset": _PRESET.value, "dims": dims, "batch": _BATCH.value, "steps": _STEPS.value, "rows": rows,
            "slope_ms_per_1k": slopes, "flops_per_key_per_layer": {"dense": per_key_dense, "indexer": per_key_index}}


def _best_seconds(fn, repeats):
    fn()  # warm-up (compiles ours)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_transformers():
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(_TORCH_THREADS.value)
    cfg = ModelConfig.preset(_HF_PRESET.value, dtype="float32", param_dtype="float32", initializer_range=0.08)
    b, p, n = _HF_BATCH.value, _HF_PROMPT.value, _HF_NEW.value
    if p + n > cfg.max_position_embeddings:
        raise ValueError(f"hf_prompt_len + hf_new_tokens = {p + n} > max_position_embeddings {cfg.max_position_embeddings}")
    with tempfile.TemporaryDirectory() as path:
        save_hf(path, cfg, _init_params(cfg, _SEED.value))
        cfg, params = load_hf(path)
        hf = transformers.DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    prompts = np.random.default_rng(_SEED.value).integers(2, cfg.vocab_size, size=(b, p))

    ours_out = {}

    def ours(speculative=False):
        out = generate(params, cfg, prompts.tolist(), n, eos_ids=(), speculative=speculative)
        ours_out["speculative" if speculative else "plain"] = np.stack([g.tokens for g in out])
        ours_out["accept_rate"] = float(np.mean([g.accept_rate for g in out])) if speculative else None

    hf_out = {}

    def theirs():
        with torch.no_grad():
            out = hf.generate(torch.as_tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(b, p, dtype=torch.long))
        hf_out["tokens"] = out[:, p:].numpy()

    ours_s = _best_seconds(ours, _HF_REPEATS.value)
    spec_s = _best_seconds(lambda: ours(speculative=True), _HF_REPEATS.value)
    hf_s = _best_seconds(theirs, _HF_REPEATS.value)
    agree = int((ours_out["plain"] == hf_out["tokens"]).sum())
    spec_agree = int((ours_out["speculative"] == ours_out["plain"]).sum())
    result = {"preset": _HF_PRESET.value, "batch": b, "prompt_len": p, "new_tokens": n,
              "torch_threads": torch.get_num_threads(), "ours_seconds": ours_s, "ours_tokens_per_s": b * n / ours_s,
              "transformers_seconds": hf_s, "transformers_tokens_per_s": b * n / hf_s,
              "greedy_tokens_agreeing": agree, "greedy_tokens": b * n,
              "speculative_seconds": spec_s, "speculative_tokens_per_s": b * n / spec_s,
              "speculative_accept_rate": ours_out["accept_rate"], "speculative_tokens_agreeing": spec_agree}
    print(f"\ntokens/s, {_HF_PRESET.value} preset, batch {b}, prompt {p}, {n} new tokens (greedy, prefill included):")
    row_fmt = "{:>26} {:>9} {:>9}"
    print(row_fmt.format("implementation", "seconds", "tokens/s"))
    print(row_fmt.format("deepseek_jax generate", f"{ours_s:.3f}", f"{b * n / ours_s:.1f}"))
    print(row_fmt.format("  + MTP speculative", f"{spec_s:.3f}", f"{b * n / spec_s:.1f}"))
    print(row_fmt.format("transformers generate", f"{hf_s:.3f}", f"{b * n / hf_s:.1f}"))
    print(f"speed-up {hf_s / ours_s:.2f}x; greedy tokens agreeing with transformers: {agree}/{b * n}; "
          f"speculative: acceptance {ours_out['accept_rate']:.3f}, tokens agreeing with plain {spec_agree}/{b * n}",
          flush=True)
    return result


def _plot(result, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["decode"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _MODES:
        ax.plot([r["context"] for r in rows], [r[f"{name}_ms"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"decode step vs context (top-k {result['decode']['dims']['index_topk']}, {result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    del argv
    print(f"device: {jax.devices()[0]}  jax {jax.__version__}", flush=True)
    result = {"device": str(jax.devices()[0]), "jax_version": jax.__version__, "decode": bench_contexts()}
    if _HF_PRESET.value:
        result["transformers"] = bench_transformers()
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {_OUT.value}")
    if _PLOT.value:
        _plot(result, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
