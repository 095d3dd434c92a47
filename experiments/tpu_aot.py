"""Compiles every Mosaic (TPU) kernel for TPU generations on a CPU machine: no TPU needed.

    python -m experiments.tpu_aot [--topologies=v5e:2x2,v5p:2x2x1,v6e:2x2,v4:2x2x1] [--kernels=...]
        [--aot_out=tpu_aot.json]

Needs libtpu (`pip install "jax[tpu]"`, in the test extra): `jax.experimental.topologies` describes a
TPU slice without one, and `jit(...).lower(...).compile()` for a device of it runs XLA's TPU compiler,
Mosaic included, on this machine (MaxText's ahead-of-time compile). So a kernel whose blocks,
scratch buffers or layouts Mosaic rejects (VMEM over the scoped limit, an unsupported relayout, a
block shape off the (8, 128) tiling) fails here as it would on the TPU, which `jax.export` (lowering
only, what the unit tests run) cannot show. Each kernel runs at V3.2 shapes (H = 128, Dqk = 576,
Dv = 512, k = 2048; indexer 64 heads x 128; decode B = 16 sequences per chip, a 128K cache of 2
layers, 5.4 GB) at its default tiles.
`--model=tiny` (any preset) adds the model's jitted steps, its attention on the Mosaic kernels:
prefill, decode_step and the sparse-stage train step. Per kernel (or step) and generation the
table gives whether it compiled, the seconds it took, the compiled program's code bytes, how
many Mosaic calls it holds and how many XLA gathers (a TPU gathers elements one at a time: XLA's
cost model prices a [512, 2048] element gather at 2.6 ms on v6e, so a gather on a kernel's path
is worth a look); a failure is listed with Mosaic's message. Compiling says nothing of speed:
timings need a TPU.
"""

import contextlib
import functools
import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from jax.experimental import topologies
from jax.experimental.layout import Format, Layout

from deepseek_jax.cache import init_cache
from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import decode_step, prefill
from deepseek_jax.model import Transformer
from deepseek_jax.training.train_step import LossConfig, train_step
from experiments.tool_checks import check_kernels_and_package
from pallas_kernels.indexer.mosaic import indexer_topk_mosaic
from pallas_kernels.indexer.mosaic_decode import indexer_topk_decode_mosaic
from pallas_kernels.sparse_mla import mosaic as sparse_mla_mosaic
from pallas_kernels.sparse_mla.mosaic_decode import sparse_mla_decode_mosaic

_KERNEL_NAMES = ("sparse_mla_fwd", "sparse_mla_bwd", "indexer", "indexer_fp8", "decode_indexer",
                 "decode_indexer_fp8", "decode_mla")
_KERNELS = flags.DEFINE_list("kernels", list(_KERNEL_NAMES), f"kernels to compile: {_KERNEL_NAMES}")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2", "v4:2x2x1"],
                                "TPU slices to compile for (jax.experimental.topologies names)")
_MODEL = flags.DEFINE_string("model", "", "also compile this model preset's steps (e.g. tiny, small), its "
                             "attention on the Mosaic kernels")
_MODEL_STEPS = flags.DEFINE_list("model_steps", ["prefill", "decode_step", "train_sparse"], "the --model steps")
_AOT_OUT = flags.DEFINE_string("aot_out", "tpu_aot.json", "JSON output path")

BF16, F32, I32, FP8 = jnp.bfloat16, jnp.float32, jnp.int32, jnp.float8_e4m3fn
H, DQK, V, K = 128, 576, 512, 2048  # V3.2 attention heads, latent + RoPE dim, value dim, selected rows
HI, DI = 64, 128                    # indexer heads x dim
T = S = 4096                        # prefill queries and keys (the grid, not the blocks, grows with them)
B, SC, L = 16, 131072, 2            # decode batch (B = 64 over 4 chips), cache rows, stacked layers


def _cases():
    """(kernel, fn, abstract args) of every Mosaic kernel at V3.2 shapes and default tiles."""
    sd = jax.ShapeDtypeStruct
    q, kv, idx = sd((1, T, H, DQK), BF16), sd((1, S, DQK), BF16), sd((1, T, K), I32)
    out, lse = sd((1, T, H, V), BF16), sd((1, T, H), F32)
    scale = DQK**-0.5
    yield "sparse_mla_fwd", functools.partial(sparse_mla_mosaic.sparse_mla_fwd, scale=scale, v_dim=V), (q, kv, idx)
    # The model's backward (its indices never repeat a row); the merge of repeats is a plain XLA sort before the kernel.
    yield ("sparse_mla_bwd", functools.partial(sparse_mla_mosaic.sparse_mla_bwd, scale=scale, v_dim=V,
                                               unique_indices=True), (q, kv, idx, out, lse, out))
    for name, dtype in (("indexer", BF16), ("indexer_fp8", FP8)):
        fn = lambda q, k, w, ks: indexer_topk_mosaic(q, k, w, topk=K, k_scale=ks)
        yield name, fn, (sd((1, S, HI, DI), dtype), sd((1, S, DI), dtype), sd((1, S, HI), F32), sd((1, S), F32))
    for name, dtype in (("decode_indexer", BF16), ("decode_indexer_fp8", FP8)):
        fn = lambda q, k, w, layer, k_len, ks: indexer_topk_decode_mosaic(q, k, w, layer, k_len, topk=K, k_scale=ks)
        yield name, fn, (sd((B, 1, HI, DI), dtype), sd((L, B, SC, DI), dtype), sd((B, 1, HI), F32), sd((), I32),
                         sd((B, 1), I32), sd((L, B, SC), F32))
    yield ("decode_mla", functools.partial(sparse_mla_decode_mosaic, scale=scale, v_dim=V),
           (sd((B, 1, H, DQK), BF16), sd((L, B, SC, DQK), BF16), sd((), I32), sd((B, 1, K), I32)))


def _model_cases(preset):
    """(step, fn, abstract args) of a model preset's jitted steps, its attention on the Pallas kernels: prefill and
    decode_step (batch 2, a 512-row cache, a 256-token prompt) and the sparse-stage train step (2 x 256 tokens)."""
    cfg = ModelConfig.preset(preset, attention_impl="pallas")
    tx = optax.adamw(1e-3)

    def init():
        params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))["params"]
        return {"params": params, "opt_state": tx.init(params)}

    state = jax.eval_shape(init)
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, 512))
    tokens = jax.ShapeDtypeStruct((2, 256), I32)
    per_sequence = jax.ShapeDtypeStruct((2,), I32)  # prefill's prompt lengths, decode_step's next tokens
    batch = {key: jax.ShapeDtypeStruct((1, 2, 256), F32 if key == "mask" else I32)
             for key in ("inputs", "targets", "mask")}
    yield "prefill", lambda p, t, n, c: prefill(p, cfg, t, n, c), (state["params"], tokens, per_sequence, cache)
    yield "decode_step", lambda p, c, t: decode_step(p, cfg, c, t), (state["params"], cache, per_sequence)
    yield ("train_sparse", lambda st, b: train_step(st, b, cfg=cfg, lc=LossConfig(dsa_stage="sparse"), tx=tx),
           (state, batch))


@contextlib.contextmanager
def _kernels_dispatch_to_mosaic():
    """The model's kernels dispatch on jax.default_backend() (`pallas_kernels/ops.py`); tracing for a TPU from a
    CPU process, it reports "tpu" so they take the Mosaic kernels."""
    default_backend = jax.default_backend
    jax.default_backend = lambda: "tpu"
    try:
        yield
    finally:
        jax.default_backend = default_backend


def compile_for(fn, args, device) -> dict:
    """AOT-compiles fn for `device` (a TPU topology's device) at abstract args (a pytree of ShapeDtypeStruct):
    {seconds, code_bytes, kernels (Mosaic calls in the compiled program), gathers (XLA gather ops in it)}.

    The args get the default row-major layouts arrays on a TPU have: left free, the compiler picks
    other entry layouts and copies each arg into the kernel's (a 20 GB copy of a decode cache)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=Format(
        Layout(tuple(range(x.ndim))), sharding)), args)
    start = time.perf_counter()
    with _kernels_dispatch_to_mosaic():
        compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    return {"seconds": time.perf_counter() - start,
            "code_bytes": compiled.memory_analysis().generated_code_size_in_bytes,
            "kernels": text.count('custom_call_target="tpu_custom_call"'), "gathers": text.count(" gather(")}


def main(argv):
    del argv
    check_kernels_and_package("tpu_aot", _KERNELS.value, _KERNEL_NAMES, "libtpu", 'pip install "jax[tpu]"')
    print(f"{'kernel':20s} {'topology':10s} {'device':12s} {'ok':>3s} {'seconds':>8s} {'code_kib':>9s} "
          f"{'kernels':>7s} {'gathers':>7s}")
    cases = [(kernel, fn, args) for kernel, fn, args in _cases() if kernel in _KERNELS.value]
    if _MODEL.value:
        cases += [(f"{_MODEL.value}/{step}", fn, args) for step, fn, args in _model_cases(_MODEL.value)
                  if step in _MODEL_STEPS.value]
    rows = []
    for topology in _TOPOLOGIES.value:
        device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
        for kernel, fn, args in cases:
            row = {"kernel": kernel, "topology": topology, "device": device.device_kind}
            try:
                row |= compile_for(fn, args, device)
                print(f"{kernel:20s} {topology:10s} {device.device_kind:12s} {'yes':>3s} {row['seconds']:>8.1f} "
                      f"{row['code_bytes'] / 1024:>9.0f} {row['kernels']:>7d} {row['gathers']:>7d}", flush=True)
            except Exception as e:  # Mosaic or XLA rejected the kernel: the message says why
                row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                print(f"{kernel:20s} {topology:10s} {device.device_kind:12s} {'no':>3s} {row['error'][:300]}",
                      flush=True)
            rows.append(row)
    with open(_AOT_OUT.value, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"wrote {_AOT_OUT.value}")
    if any("error" in row for row in rows):
        raise SystemExit("some kernels did not compile")


if __name__ == "__main__":
    app.run(main)
