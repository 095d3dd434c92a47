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
Per kernel and generation the table gives whether it compiled, the seconds it took, and the
compiled program's code bytes; a failure is listed with Mosaic's message. Compiling says nothing of
speed: timings need a TPU.
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import topologies
from jax.experimental.layout import Format, Layout

from pallas_kernels.indexer.mosaic import indexer_topk_mosaic
from pallas_kernels.indexer.mosaic_decode import indexer_topk_decode_mosaic
from pallas_kernels.sparse_mla import mosaic as sparse_mla_mosaic
from pallas_kernels.sparse_mla.mosaic_decode import sparse_mla_decode_mosaic

_KERNEL_NAMES = ("sparse_mla_fwd", "sparse_mla_bwd", "indexer", "indexer_fp8", "decode_indexer",
                 "decode_indexer_fp8", "decode_mla")
_KERNELS = flags.DEFINE_list("kernels", list(_KERNEL_NAMES), f"kernels to compile: {_KERNEL_NAMES}")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2", "v4:2x2x1"],
                                "TPU slices to compile for (jax.experimental.topologies names)")
_AOT_OUT = flags.DEFINE_string("aot_out", "tpu_aot.json", "JSON output path")

BF16, F32, I32, FP8 = jnp.bfloat16, jnp.float32, jnp.int32, jnp.float8_e4m3fn
H, DQK, V, K = 128, 576, 512, 2048  # V3.2 attention heads, latent + RoPE dim, value dim, selected rows
HI, DI = 64, 128                    # indexer heads x dim
T = S = 4096                        # prefill queries and keys (the grid, not the blocks, grows with them)
B, SC, L = 16, 131072, 2            # decode batch (B = 64 over 4 chips), cache rows, stacked layers


def _cases():
    """(kernel, fn, [(shape, dtype)]) of every Mosaic kernel at V3.2 shapes and default tiles."""
    q, kv, idx = ((1, T, H, DQK), BF16), ((1, S, DQK), BF16), ((1, T, K), I32)
    out, lse = ((1, T, H, V), BF16), ((1, T, H), F32)
    scale = DQK**-0.5
    yield "sparse_mla_fwd", functools.partial(sparse_mla_mosaic.sparse_mla_fwd, scale=scale, v_dim=V), [q, kv, idx]
    yield ("sparse_mla_bwd", functools.partial(sparse_mla_mosaic.sparse_mla_bwd, scale=scale, v_dim=V),
           [q, kv, idx, out, lse, out])
    for name, dtype in (("indexer", BF16), ("indexer_fp8", FP8)):
        fn = lambda q, k, w, ks: indexer_topk_mosaic(q, k, w, topk=K, k_scale=ks)
        yield name, fn, [((1, S, HI, DI), dtype), ((1, S, DI), dtype), ((1, S, HI), F32), ((1, S), F32)]
    for name, dtype in (("decode_indexer", BF16), ("decode_indexer_fp8", FP8)):
        fn = lambda q, k, w, layer, k_len, ks: indexer_topk_decode_mosaic(q, k, w, layer, k_len, topk=K, k_scale=ks)
        yield name, fn, [((B, 1, HI, DI), dtype), ((L, B, SC, DI), dtype), ((B, 1, HI), F32), ((), I32),
                         ((B, 1), I32), ((L, B, SC), F32)]
    yield ("decode_mla", functools.partial(sparse_mla_decode_mosaic, scale=scale, v_dim=V),
           [((B, 1, H, DQK), BF16), ((L, B, SC, DQK), BF16), ((), I32), ((B, 1, K), I32)])


def compile_for(fn, shapes, device) -> dict:
    """AOT-compiles fn for `device` (a TPU topology's device) at abstract args: {seconds, code_bytes}.

    The args get the default row-major layouts arrays on a TPU have: left free, the compiler picks
    other entry layouts and copies each arg into the kernel's (a 20 GB copy of a decode cache)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=Format(Layout(tuple(range(len(shape)))), sharding))
            for shape, dtype in shapes]
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return {"seconds": time.perf_counter() - start,
            "code_bytes": compiled.memory_analysis().generated_code_size_in_bytes}


def main(argv):
    del argv
    if not set(_KERNELS.value) <= set(_KERNEL_NAMES):
        raise SystemExit(f"--kernels: expected a subset of {_KERNEL_NAMES}, got {_KERNELS.value}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit('experiments.tpu_aot needs libtpu: pip install "jax[tpu]"') from None
    print(f"{'kernel':20s} {'topology':10s} {'device':12s} {'ok':>3s} {'seconds':>8s} {'code_kib':>9s}")
    rows = []
    for topology in _TOPOLOGIES.value:
        device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
        for kernel, fn, shapes in _cases():
            if kernel not in _KERNELS.value:
                continue
            row = {"kernel": kernel, "topology": topology, "device": device.device_kind}
            try:
                row |= compile_for(fn, shapes, device)
                print(f"{kernel:20s} {topology:10s} {device.device_kind:12s} {'yes':>3s} {row['seconds']:>8.1f} "
                      f"{row['code_bytes'] / 1024:>9.0f}", flush=True)
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
