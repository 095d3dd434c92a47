"""Benchmarks the MLA attention block, sparse (DSA) vs dense, forward only, as T grows at fixed k.

The block is `deepseek_jax.layers.mla.MLA`: q/kv projections, lightning indexer, attention and
output projection. For each T one set of params is drawn and both paths run on the same input:

  sparse: attention_mode="sparse" - indexer top-k (k = --topk) + absorbed sparse MLA, chunked
          over queries; attention work O(T·k), memory O(T). The indexer still scores every
          (query, key) pair, so its O(T²) work dominates the time at long T.
  dense : attention_mode="dense"  - causal MHA with an [H, T, T] float32 score tensor; skipped
          ("skipped" in the table, null in the JSON) when H·T²·4 bytes > --max_dense_bytes.

Each path is jitted with the mode static, compiled once with `.lower(...).compile()`, run once to
warm up, then timed --repeats times with `block_until_ready`; the median is reported.

    python -m experiments.bench_attention [--preset=small] [--seq_lens=2048,...,32768] [--topk=256]
        [--repeats=1] [--dtype=float32] [--chunk=N] [--max_dense_bytes=8e9] [--out=bench_attention.json]

Columns:
  T               sequence length (queries = keys; batch --batch)
  sparse_ms       median forward time of the sparse path
  dense_ms        median forward time of the dense path, or "skipped"
  dense/sparse    dense_ms / sparse_ms (> 1: sparse is faster)
  sparse_peak_MiB peak device memory of the compiled sparse forward, from
                  `compiled.memory_analysis()`: temp + arguments + outputs ("n/a" when the
                  backend has no memory analysis); the JSON also keeps temp alone
  dense_peak_MiB  the same for the dense path
  T2_fp32_MiB     T²·4 bytes: one [T, T] float32 array, the yardstick of quadratic memory
  sparse/T2       sparse peak / (T²·4); must be well below 1 at T = 16K and halve each time T
                  doubles (memory O(T)); if it stops falling, something materialises [T, T]
Then the growth exponent of each path: the least-squares slope of log(time) vs log(T) over the
Ts it ran (2 = quadratic). The sparse path still has the indexer's O(T²) scoring, so its
exponent is above 1 and nears 2 once the indexer dominates.

Absolute times on shared machines (and CPUs) are noisy; the dense/sparse ratio and the growth
exponents are what matter. --repeats defaults to 1 (one warm-up + one timed run per path and T)
so that the default run stays near 10 minutes on a shared 2-core CPU, where --repeats=3 took 15
minutes, most of it in the sparse path at 32K and the dense path at 8K; use --repeats=3 or more
on a quiet machine or an accelerator.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deepseek_jax import ModelConfig
from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.rope import rope_cos_sin

_PRESET = flags.DEFINE_string("preset", "small", "ModelConfig preset whose attention dims are used")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384", "32768"], "sequence lengths T")
_TOPK = flags.DEFINE_integer("topk", 256, "indexer top-k (overrides the preset's index_topk)")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed runs per path and T (the median is reported)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype")
_CHUNK = flags.DEFINE_integer("chunk", None, "attention_chunk_size override (default: the preset's)")
_MAX_DENSE_BYTES = flags.DEFINE_float("max_dense_bytes", 8e9,
                                      "skip the dense path when its [H, T, T] float32 scores exceed this")
_OUT = flags.DEFINE_string("out", "bench_attention.json", "JSON output path")
_SEED = flags.DEFINE_integer("seed", 0, "params / input seed")

_MODES = ("sparse", "dense")


def _mla_apply(params, x, cos, sin, *, cfg, mode):
    return MLA(cfg, attention_mode=mode).apply({"params": params}, x, cos, sin)


_mla_apply_jit = jax.jit(_mla_apply, static_argnames=("cfg", "mode"))


def _memory(compiled):
    """(temp bytes, peak bytes = temp + arguments + outputs), or (None, None) without an analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None, None
    temp = stats.temp_size_in_bytes
    return temp, temp + stats.argument_size_in_bytes + stats.output_size_in_bytes


def _bench(cfg, mode, args, repeats):
    """Compiles, warms up and times one path: (median ms, temp bytes, peak bytes)."""
    compiled = _mla_apply_jit.lower(*args, cfg=cfg, mode=mode).compile()
    temp, peak = _memory(compiled)
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), temp, peak


def _inputs(cfg, t, key):
    """(params, x, cos, sin) for length t. Params don't depend on t, so init reads a short
    prefix of x: initialising on the full sequence would run an un-jitted forward."""
    b = _BATCH.value
    init_key, x_key = jax.random.split(key)
    x = jax.random.normal(x_key, (b, t, cfg.hidden_size), cfg.compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(positions, cfg)
    short = slice(0, min(t, 8))
    params = MLA(cfg, attention_mode="dense").init(init_key, x[:, short], cos[:, short], sin[:, short])["params"]
    return params, x, cos, sin


def _growth_exponent(ts, ms):
    """Least-squares slope of log(ms) vs log(T); None with fewer than two points."""
    if len(ts) < 2:
        return None
    return float(np.polyfit(np.log(ts), np.log(ms), 1)[0])


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main(argv):
    del argv
    overrides = dict(index_topk=_TOPK.value, dtype=_DTYPE.value)
    if _CHUNK.value is not None:
        overrides["attention_chunk_size"] = _CHUNK.value
    cfg = ModelConfig.preset(_PRESET.value, **overrides)
    dims = {name: getattr(cfg, name) for name in (
        "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk",
        "attention_chunk_size", "dtype", "param_dtype")}
    print(f"device: {jax.devices()[0]}  jax {jax.__version__}  preset={_PRESET.value} batch={_BATCH.value} "
          f"repeats={_REPEATS.value}\ndims: {dims}", flush=True)

    header = ("T", "sparse_ms", "dense_ms", "dense/sparse", "sparse_peak_MiB", "dense_peak_MiB",
              "T2_fp32_MiB", "sparse/T2")
    row_fmt = "{:>6} {:>10} {:>10} {:>12} {:>15} {:>14} {:>11} {:>9}"
    print(row_fmt.format(*header), flush=True)

    rows = []
    for t in (int(s) for s in _SEQ_LENS.value):
        args = _inputs(cfg, t, jax.random.fold_in(jax.random.PRNGKey(_SEED.value), t))
        t2_bytes = t * t * 4
        sparse_ms, sparse_temp, sparse_peak = _bench(cfg, "sparse", args, _REPEATS.value)
        dense_ms = dense_temp = dense_peak = None
        if cfg.num_attention_heads * t2_bytes <= _MAX_DENSE_BYTES.value:
            dense_ms, dense_temp, dense_peak = _bench(cfg, "dense", args, _REPEATS.value)
        ratio = None if dense_ms is None else dense_ms / sparse_ms
        rows.append(dict(T=t, sparse_ms=sparse_ms, dense_ms=dense_ms, ratio=ratio,
                         sparse_temp_bytes=sparse_temp, dense_temp_bytes=dense_temp,
                         sparse_peak_bytes=sparse_peak, dense_peak_bytes=dense_peak, t2_fp32_bytes=t2_bytes))
        print(row_fmt.format(
            t, f"{sparse_ms:.1f}", "skipped" if dense_ms is None else f"{dense_ms:.1f}",
            "-" if ratio is None else f"{ratio:.2f}", _mib(sparse_peak), _mib(dense_peak), _mib(t2_bytes),
            "n/a" if sparse_peak is None else f"{sparse_peak / t2_bytes:.3f}"), flush=True)

    growth = {
        mode: _growth_exponent([r["T"] for r in rows if r[f"{mode}_ms"] is not None],
                               [r[f"{mode}_ms"] for r in rows if r[f"{mode}_ms"] is not None])
        for mode in _MODES
    }
    print("growth exponent (slope of log time vs log T): "
          + "  ".join(f"{m}={'n/a' if g is None else f'{g:.2f}'}" for m, g in growth.items()))

    result = {"device": str(jax.devices()[0]), "preset": _PRESET.value, "topk": _TOPK.value, "batch": _BATCH.value,
              "repeats": _REPEATS.value, "dims": dims, "rows": rows, "growth_exponent": growth,
              "jax_version": jax.__version__}
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
