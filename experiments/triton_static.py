"""Static check of the Triton kernels without a GPU: registers, spills, shared memory, MMA kind.

    python -m experiments.triton_static [--kernels=indexer,sparse_mla_fwd,...] [--out=triton_static.json]
        [--index_configs=...] [--index_fp8_configs=...] [--topk_configs=...] [--configs=...] [--bwd_configs=...] [--decode_configs=...] [--decode_mla_configs=...]

For each kernel and each tile config of `experiments/bench_kernels.py`'s sweeps (the same flags
and defaults), at V3.2 shapes, the Pallas kernel is lowered for CUDA on this CPU machine, its
Triton IR is compiled for sm_90a (H100/H200) by the `triton` package (`pip install triton`; no GPU
needed: the package ships ptxas) through the passes XLA runs on it (`_make_ttir`: triton.compile
alone skips the TTIR passes of an IR file), and ptxas reports registers per thread and spilled
bytes. Per config the table gives:
  - regs: registers per thread (255 is the cap);
  - spill: bytes stored + loaded to local memory per thread (should be 0);
  - smem_kib: shared memory per program (an H200 SM has 227 KiB; more fails to launch);
  - per_sm: programs resident per SM, the fewest that registers (65536 per SM, allocated in
    steps of 8 per thread), shared memory (228 KiB, 1 KiB reserved per program) and warps (64)
    allow: 1 means no other program hides this one's memory latency;
  - wgmma / mma: matmuls on Hopper's warpgroup MMA vs the older mma.sync path;
  - cvt: layout conversions (each a shared-memory round trip unless trivial);
  - atom / red / membar: global atomics that return a value (ATOMG) or not (REDG), and memory
    barriers (MEMBAR), counted in the SASS (the package's cuobjdump): an acquire-release atomic
    brings a MEMBAR and an L1 invalidation with it (`pallas_kernels/triton_lowering.py`);
  - shfl / sass: warp shuffles and all instructions in the SASS (static counts, not executed ones:
    a loop body counts once), e.g. the indexer's head sum across lanes vs within threads;
  - loop_lmem: spill loads and stores (LDL/STL) inside a loop body (between a backward branch and
    its target), the spills that cost every iteration; spills outside loops cost once per program.
A config Triton or ptxas rejects is listed with its error. Caveat: XLA compiles Pallas kernels
with its own bundled Triton, not this package's, so the figures are indicative (a config that
spills here likely spills there), not measurements; timings need `bench_kernels` on a GPU.
"""

import contextlib
import functools
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags
from jax._src.pallas.triton import (
    lowering as pallas_triton_lowering,  # the Triton IR of each pallas_call
)

from experiments import bench_kernels as bench
from experiments.tool_checks import check_kernels_and_package
from pallas_kernels.indexer.triton import indexer_scores_triton
from pallas_kernels.indexer.triton_decode import indexer_scores_decode_triton
from pallas_kernels.sparse_mla.triton import sparse_mla_bwd, sparse_mla_fwd
from pallas_kernels.sparse_mla.triton_decode import sparse_mla_decode_triton
from pallas_kernels.topk_triton import select_topk_triton
from pallas_kernels.triton_lowering import TRITON_CALL, export_for_cuda

_KERNEL_NAMES = ("indexer", "indexer_fp8", "topk", "decode_indexer", "sparse_mla_fwd", "sparse_mla_bwd", "decode_mla")
_KERNELS = flags.DEFINE_list("kernels", list(_KERNEL_NAMES), f"kernels to check: {_KERNEL_NAMES}")
_STATIC_OUT = flags.DEFINE_string("static_out", "triton_static.json", "JSON output path")
_ARCH = flags.DEFINE_integer("arch", 90, "CUDA compute capability to compile for (90: H100/H200)")

sd = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
H, DQK, V, K = 128, 576, 512, 2048  # V3.2 attention heads, latent + RoPE dim, value dim, selected rows
HI, DI = 64, 128                    # indexer heads x dim


@contextlib.contextmanager
def _captured_triton_ir():
    """Collects the Triton IR (text, no locations) of every pallas_call lowered inside the block."""
    modules, lower = [], pallas_triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    pallas_triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        pallas_triton_lowering.lower_jaxpr_to_triton_module = lower


def triton_kernels(fn, *args):
    """[(Triton IR text, num_warps, num_stages)] of the pallas_calls in fn(*args), lowered for CUDA (tracing only:
    nothing runs). The warps and stages are the ones the kernel passes, read from its custom call."""
    with _captured_triton_ir() as modules:
        exported = export_for_cuda(fn, args)
    calls = {}
    for line in exported.mlir_module().splitlines():
        if TRITON_CALL in line:
            name = re.search(r'name = "(\w+)"', line).group(1)
            calls[name] = tuple(int(re.search(rf"{key} = (\d+)", line).group(1)) for key in ("num_warps", "num_stages"))
    return [(ir, *calls[re.search(r"tt\.func public @(\w+)", ir).group(1)]) for ir in modules]


def _ptxas():
    """The packaged ptxas that reads the PTX this triton emits (the Blackwell one is the newer)."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    raise FileNotFoundError(f"no ptxas in {bin_dir}")


def _make_ttir(path: str, target, options: dict) -> str:
    """Runs Triton's TTIR passes (inline, canonicalize, combine, CSE, loop unroll) on the IR file at `path`.

    triton.compile skips the passes of an IR file's own stage, but XLA runs them on every Pallas kernel
    (`MakeTTIR` in its CUDA pipeline), and they change the code: the combine pass folds
    `acc + dot(a, b)` into a dot accumulating into acc, without which a second accumulator is live.
    """
    from triton._C.libtriton import ir
    from triton.backends.compiler import Language
    from triton.compiler import make_backend
    backend = make_backend(target)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(path, context)
    module.context = context
    stages = {}
    backend.add_stages(stages, backend.parse_options(options), Language.TRITON)
    return str(stages["ttir"](module, {}))


def compile_options(num_warps: int, num_stages: int) -> dict:
    """Triton compile options: the kernel's warps and stages, and FMA contraction on, as triton has defaulted so
    far (3.10 is to turn it off): set, the figures do not move with that default."""
    return {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}


def compile_stats(ttir: str, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compiles Triton IR for sm_<arch>a with the triton package, through the passes XLA runs, and returns its
    resource figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    target, options = GPUTarget("cuda", arch, 32), compile_options(num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        optimized = _make_ttir(path, target, options)
        with open(path, "w") as f:
            f.write(optimized)
        compiled = triton.compile(path, target=target, options=options)
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(_ptxas()), "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    ttgir = compiled.asm["ttgir"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    regs, smem = int(re.search(r"Used (\d+) registers", report).group(1)), compiled.metadata.shared
    per_sm = min(65536 // (-(-regs // 8) * 8 * 32 * num_warps), 228 * 1024 // (smem + 1024), 64 // num_warps)
    instrs = [(int(address, 16), opcode, rest) for address, opcode, rest in re.findall(
        r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)$", sass, re.MULTILINE)]
    opcodes = [opcode for _, opcode, _ in instrs]
    # A loop body: from a backward branch's target to the branch.
    loops = [(int(target, 16), address) for address, opcode, rest in instrs if opcode == "BRA"
             for target in re.findall(r"^\s+(0x[0-9a-f]+)", rest) if int(target, 16) < address]
    loop_lmem = sum(opcode in ("LDL", "STL") and any(lo <= address <= hi for lo, hi in loops)
                    for address, opcode, _ in instrs)
    return {"regs": regs, "spill": sum(spills), "smem_kib": smem / 1024, "per_sm": per_sm,
            "wgmma": ttgir.count("ttng.warp_group_dot"), "mma": len(re.findall(r"= tt\.dot ", ttgir)),
            "cvt": ttgir.count("ttg.convert_layout"), "atom": opcodes.count("ATOMG"), "red": opcodes.count("REDG"),
            "membar": opcodes.count("MEMBAR"), "shfl": opcodes.count("SHFL"), "sass": len(opcodes),
            "loop_lmem": loop_lmem}


def _cases():
    """(kernel, config, fn, args) for every configured tile of every kernel, at V3.2 shapes."""
    for kernel, dtype, configs in (("indexer", BF16, bench._INDEX_CONFIGS.value),
                                   ("indexer_fp8", jnp.float8_e4m3fn, bench._INDEX_FP8_CONFIGS.value)):
        for cfg in (c for c in configs if not bench.index_tiles(c).get("mosaic_gpu")):  # Triton kernels only
            args = (sd((1, 512, HI, DI), dtype), sd((1, 65536, DI), dtype), sd((1, 512, HI), F32), sd((1, 65536), F32),
                    sd((1,), I32), sd((512,), I32))
            scores = functools.partial(indexer_scores_triton, q_offset=65536 - 512, **bench.index_tiles(cfg))
            yield kernel, cfg, scores, args
    for cfg in bench._TOPK_CONFIGS.value:  # one chunk of the 64K indexer's scores
        yield "topk", cfg, functools.partial(select_topk_triton, k=K, **bench.topk_tiles(cfg)), (sd((512, 65536), F32),)
    for cfg in (c for c in bench._DECODE_CONFIGS.value if not bench.decode_tiles(c).get("mosaic_gpu")):
        args = (sd((64, 1, HI, DI), BF16), sd((2, 64, 131072, DI), BF16), sd((64, 1, HI), F32), sd((), I32),
                sd((64, 1), I32))
        yield "decode_indexer", cfg, functools.partial(indexer_scores_decode_triton, **bench.decode_tiles(cfg)), args
    mla = (sd((1, 128, H, DQK), BF16), sd((1, 4096, DQK), BF16), sd((1, 128, K), I32))
    for cfg in bench._CONFIGS.value:
        fwd = functools.partial(sparse_mla_fwd, scale=DQK**-0.5, v_dim=V, **bench.fwd_tiles(cfg))
        yield "sparse_mla_fwd", cfg, fwd, mla
    out = (sd((1, 128, H, V), BF16), sd((1, 128, H), F32), sd((1, 128, H, V), BF16))
    for cfg in bench._BWD_CONFIGS.value:
        bwd = functools.partial(sparse_mla_bwd, scale=DQK**-0.5, v_dim=V, **bench.bwd_tiles(cfg))
        yield "sparse_mla_bwd", cfg, bwd, mla + out
    for cfg in bench._DECODE_MLA_CONFIGS.value:
        args = (sd((64, 1, H, DQK), BF16), sd((2, 64, 131072, DQK), BF16), sd((), I32), sd((64, 1, K), I32))
        decode = functools.partial(sparse_mla_decode_triton, scale=DQK**-0.5, v_dim=V, **bench.decode_mla_tiles(cfg))
        yield "decode_mla", cfg, decode, args


def main(argv):
    del argv
    check_kernels_and_package("triton_static", _KERNELS.value, _KERNEL_NAMES, "triton", "pip install triton")
    print(f"{'kernel':16s} {'config':18s} {'call':>4s} {'regs':>5s} {'spill':>6s} {'smem_kib':>8s} {'per_sm':>6s} "
          f"{'wgmma':>5s} {'mma':>4s} {'cvt':>4s} {'atom':>4s} {'red':>4s} {'membar':>6s} {'shfl':>5s} {'sass':>6s} "
          f"{'loop_lmem':>9s}")
    rows = []
    for kernel, cfg, fn, args in _cases():
        if kernel not in _KERNELS.value:
            continue
        for call, (ttir, warps, stages) in enumerate(triton_kernels(fn, *args)):  # the split backward has two
            row = {"kernel": kernel, "config": cfg, "call": call}
            try:
                row |= compile_stats(ttir, warps, stages, _ARCH.value)
                print(f"{kernel:16s} {cfg:18s} {call:>4d} {row['regs']:>5d} {row['spill']:>6d} "
                      f"{row['smem_kib']:>8.1f} {row['per_sm']:>6d} {row['wgmma']:>5d} {row['mma']:>4d} "
                      f"{row['cvt']:>4d} {row['atom']:>4d} {row['red']:>4d} {row['membar']:>6d} {row['shfl']:>5d} "
                      f"{row['sass']:>6d} {row['loop_lmem']:>9d}", flush=True)
            except Exception as e:  # a config Triton or ptxas rejects (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{kernel:16s} {cfg:18s} {call:>4d} failed: {row['error'][:200]}", flush=True)
            rows.append(row)
    with open(_STATIC_OUT.value, "w") as f:
        json.dump({"arch": _ARCH.value, "rows": rows}, f, indent=1)
    print(f"wrote {_STATIC_OUT.value}")


if __name__ == "__main__":
    app.run(main)
