"""The benchmark binaries run end to end on tiny sizes (kernels in Pallas interpret mode), so a GPU
session's few minutes are never spent on a broken script. Timings here mean nothing; the checks
are that every part ran, wrote its rows and agreed with its reference."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pallas_kernels.indexer import mosaic_gpu

ROOT = pathlib.Path(__file__).parents[2]
KERNELS = ["--interpret", "--seq_lens=128", "--sweep_len=128", "--check_len=64", "--topk=32", "--heads=16",
           "--v_dim=32", "--rope_dim=16", "--configs=16:16:4:1,16:16:4:1:v2", "--max_reference_len=128", "--repeats=1",
           "--bwd_configs=16:16:4:1,16:16:4:1:split", "--bwd_len=128", "--max_reference_bwd_len=128",
           "--index_heads=4", "--index_dim=16", "--index_configs=4:16:4:1,4:16:4:1:loop", "--index_fp8_configs=2:16:4:1:loop",
           "--index_chunk=64",
           "--decode_batch=2", "--decode_len=256", "--decode_configs=64:4:1:1,32:4:4:2", "--decode_mla_configs=16:16:4:1,16:16:4:2",
           "--topk_configs=64:4"]


def _run(module, out, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, f"--out={out}", *flags], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
def test_bench_kernels_every_part(tmp_path):
    result, stdout = _run("experiments.bench_kernels", tmp_path / "kernels.json", *KERNELS)
    names = [r["kernel"] for r in result["rows"]]
    for prefix in ("decode indexer pallas", "decode old: xla reference", "decode sparse_mla pallas [16:16:4:2]",
                   "decode sparse_mla old: gather + prefill kernel", "sparse_mla pallas", "sparse_mla xla reference",
                   "dense causal MHA", "indexer_topk pallas grid", "indexer_topk pallas key-loop",
                   "indexer_topk pallas 1 run", "indexer_topk xla reference", "indexer + sparse_mla (pallas)",
                   "sparse_mla bwd pallas [16:16:4:1]", "sparse_mla bwd pallas [16:16:4:1:split]",
                   "sparse_mla pallas query-major", "sparse_mla bwd pallas query-major",
                   "indexer_topk pallas select_topk", "indexer_topk pallas fp8 key-loop [2:16:4:1:loop]",
                   "top-k kernel [64:4]", "decode indexer topk kernel"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(r["ms"] > 0 for r in result["rows"])
    # every indexer variant selected the reference's keys; the attention kernels stayed within bf16 error
    agreements = [line for line in stdout.splitlines() if "agreement with the reference's index sets" in line]
    assert len(agreements) == 6 and all(line.endswith("1.0000") for line in agreements), agreements
    equal = [line for line in stdout.splitlines() if "kernel equals select_topk" in line
             or "equal to select_topk" in line]  # the top-k kernel, prefill chunk and decode
    assert len(equal) == 3 and all(line.endswith("True") for line in equal), equal
    assert all(err < 0.05 for err in result["check"].values())
    backward = [line.split(": ")[1].split() for line in stdout.splitlines()
                if "relative max error vs reference VJP" in line]
    assert len(backward) == 2 and all(float(f[1]) < 0.05 and float(f[3]) < 0.05 for f in backward), backward
    assert "DSA at T=128: indexer + sparse_mla" in stdout and set(result["prefill_seconds"]) == {"128"}
    # The indexer part on its own (as gpu_check.sh runs it) takes the forward and dense timings from that JSON;
    # without the variants (gpu_check.sh kernels) it times the default form only.
    alone, stdout = _run("experiments.bench_kernels", tmp_path / "indexer.json", *KERNELS, "--parts=indexer",
                         f"--prefill_from={tmp_path / 'kernels.json'}", "--noindex_variants")
    names = [r["kernel"] for r in alone["rows"]]
    assert names.count("indexer + sparse_mla (pallas)") == 1 and "DSA at T=128: indexer + sparse_mla" in stdout
    assert alone["prefill_seconds"] == result["prefill_seconds"]
    assert not any(" 1 run " in n or "select_topk" in n or "1 chunk" in n for n in names), names


@pytest.mark.slow
@pytest.mark.skipif(mosaic_gpu.JAX_010, reason="JAX 0.10's Mosaic GPU interpreter lacks transposed wgmma operands")
def test_bench_kernels_times_the_mosaic_gpu_indexer(tmp_path):
    """":mgpu" configs run the Mosaic GPU scores kernel (interpreted here), bf16 and fp8, beside a Triton one."""
    result, stdout = _run("experiments.bench_kernels", tmp_path / "mgpu.json", *KERNELS, "--parts=indexer,decode",
                          "--seq_lens=64", "--sweep_len=64", "--check_len=48", "--max_reference_len=0",
                          "--index_dim=128", "--index_configs=2:64:12:2:mgpu,4:16:4:1:loop",
                          "--index_fp8_configs=2:64:12:2:mgpu", "--noindex_variants",
                          "--decode_configs=64:8:2:2:mgpu,64:4:1:1")
    names = [r["kernel"] for r in result["rows"]]
    for prefix in ("indexer_topk pallas mosaic-gpu [2:64:12:2:mgpu]", "indexer_topk pallas key-loop [4:16:4:1:loop]",
                   "indexer_topk pallas fp8 mosaic-gpu [2:64:12:2:mgpu]",
                   "decode indexer pallas [64:8:2:2:mgpu] B2 T1 bf16", "decode indexer pallas [64:8:2:2:mgpu] B2 T1 fp8",
                   "decode indexer pallas [64:4:1:1] B2 T1 fp8"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    # 3 prefill configs; decode: 2 configs in bf16, the best of each kernel in fp8
    agreements = [line for line in stdout.splitlines() if "agreement with the reference's index sets" in line]
    assert len(agreements) == 7 and all(line.endswith("1.0000") for line in agreements), agreements


def test_index_configs_name_their_kernel():
    from experiments import bench_kernels as bench
    assert bench.decode_tiles("128:8:64:4:mgpu") == {"block_s": 128, "blocks": 64, "num_stages": 4, "mosaic_gpu": True}
    with pytest.raises(ValueError, match="2 warpgroups, num_warps 8"):
        bench.decode_tiles("128:4:64:4:mgpu")
    assert [bench.index_kind(c) for c in ("4:128:8:2", "2:128:8:2:loop", "2:128:12:3:mgpu")] == [
        "grid", "key-loop", "mosaic-gpu"]
    assert bench.index_tiles("2:128:12:3:mgpu") == {"block_t": 2, "block_s": 128, "num_stages": 3, "mosaic_gpu": True}
    with pytest.raises(ValueError, match="3 warpgroups"):
        bench.index_tiles("2:128:8:3:mgpu")
    with pytest.raises(ValueError, match="want block_t:block_s:num_warps:num_stages"):
        bench.index_tiles("2:128:8:3:fast")


def test_attention_configs_name_the_walk():
    """":all" walks every index block in the forward (the default stops at the last used slot); ":used" stops there in
    decode (whose default walks every block)."""
    from experiments import bench_kernels as bench
    tiles = {"block_h": 32, "block_k": 64, "num_warps": 4}
    assert bench.fwd_tiles("32:64:4:2") == tiles | {"num_stages": 2}
    assert bench.fwd_tiles("32:64:4:2:all") == tiles | {"num_stages": 2, "walk_all": True}
    assert bench.fwd_tiles("64:32:8:2:v2:all") == {"block_h": 64, "block_k": 32, "num_warps": 8, "num_stages": 2,
                                                   "v_split": 2, "walk_all": True}
    assert bench.decode_mla_tiles("32:64:4:1") == tiles | {"num_splits": 1, "walk_all": True}
    assert bench.decode_mla_tiles("32:64:4:1:used") == tiles | {"num_splits": 1, "walk_all": False}
    for bad, parse in (("32:64:4:2:used", bench.fwd_tiles), ("32:64:4:1:all", bench.decode_mla_tiles)):
        with pytest.raises(ValueError, match="want block_h:block_k"):
            parse(bad)


@pytest.mark.parametrize("module, flags, key", [
    ("experiments.bench_attention", ["--preset=tiny", "--seq_lens=64,128", "--topk=16"], "rows"),
    ("experiments.bench_decode", ["--preset=tiny", "--layers=2", "--heads=4", "--kv_lora_rank=32", "--index_heads=4",
                                  "--topk=16", "--contexts=64,128", "--steps=1", "--warmup=1", "--hf_preset=",
                                  "--plot="], "decode"),
])
def test_model_benchmarks(tmp_path, module, flags, key):
    result, _ = _run(module, tmp_path / "out.json", *flags)
    assert len(result[key]) >= 2


def test_triton_static_compiles_every_kernel_offline(tmp_path):
    """experiments.triton_static compiles one config of each Triton kernel for sm_90a on this CPU machine (pip
    triton's compiler and ptxas) and reports its resources; the defaults fit an H200's 227 KiB of shared memory."""
    out = tmp_path / "static.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = ["--index_configs=4:128:8:2,2:128:8:2:loop", "--index_fp8_configs=4:128:8:2:loop", "--topk_configs=4096:8", "--decode_configs=128:4:1:1,128:4:8:3",
             "--configs=32:64:4:2",
             "--bwd_configs=32:32:8:2,32:16:8:2:split", "--decode_mla_configs=32:64:4:1"]
    proc = subprocess.run([sys.executable, "-m", "experiments.triton_static", f"--static_out={out}", *flags],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["config"], r["call"]) for r in rows] == [
        ("indexer", "4:128:8:2", 0), ("indexer", "2:128:8:2:loop", 0), ("indexer_fp8", "4:128:8:2:loop", 0),
        ("topk", "4096:8", 0),
        ("decode_indexer", "128:4:1:1", 0), ("decode_indexer", "128:4:8:3", 0),
        ("sparse_mla_fwd", "32:64:4:2", 0), ("sparse_mla_bwd", "32:32:8:2", 0),
        ("sparse_mla_bwd", "32:16:8:2:split", 0), ("sparse_mla_bwd", "32:16:8:2:split", 1),
        ("decode_mla", "32:64:4:1", 0)]
    assert all("error" not in r and 0 < r["regs"] <= 255 and r["smem_kib"] <= 227 and r["per_sm"] >= 1
               for r in rows), rows
    # Every kernel's matmuls reach the tensor cores (the top-k kernel has none).
    assert all(r["wgmma"] + r["mma"] > 0 for r in rows if r["kernel"] != "topk"), rows
    assert all(r["wgmma"] > 0 for r in rows if r["kernel"] == "indexer_fp8"), rows  # fp8 wgmma, not an f16 upcast
    # The indexers' head sum runs within threads (keys x (query, head) logits): 320 / 160 shuffles across lanes before.
    assert all(r["shfl"] <= 32 for r in rows if "indexer" in r["kernel"]), rows
    # The backward adds dkv with relaxed REDs: no value-returning atomics, no memory barriers (the split form's
    # first kernel, dq, adds nothing).
    bwd = [r for r in rows if r["kernel"] == "sparse_mla_bwd" and not (r["config"].endswith("split") and r["call"] == 0)]
    assert bwd and all(r["red"] > 0 and r["atom"] == 0 and r["membar"] == 0 for r in bwd), bwd
    # The decode attention's default tile (32 heads x 64 rows, 4 warps; the fastest on an H200, 1.19x the 64-head
    # tile's wgmma, which fits one program per SM) keeps 2 programs per SM to hide its row gathers.
    [decode] = [r for r in rows if r["kernel"] == "decode_mla"]
    assert decode["per_sm"] >= 2 and decode["mma"] > 0, decode


def test_triton_static_runs_the_ttir_passes_xla_runs(tmp_path):
    """triton.compile skips an IR file's own TTIR passes, which XLA runs on every Pallas kernel. Without the combine
    pass the forward's `acc * alpha + p·v` adds a second [64, 512] float32 accumulator to acc (128 more registers
    per thread at 8 warps); `_make_ttir` folds the add into the dot, as XLA's compile does."""
    import jax
    import jax.numpy as jnp
    from triton.backends.compiler import GPUTarget

    from experiments import triton_static
    from pallas_kernels.sparse_mla.triton import sparse_mla_fwd

    sd = jax.ShapeDtypeStruct
    fwd = functools.partial(sparse_mla_fwd, scale=0.1, v_dim=512, block_h=64, block_k=16, num_warps=8)
    [(ttir, warps, stages)] = triton_static.triton_kernels(
        fwd, sd((1, 2, 64, 576), jnp.bfloat16), sd((1, 64, 576), jnp.bfloat16), sd((1, 2, 32), jnp.int32))
    path = tmp_path / "kernel.ttir"
    path.write_text(ttir)
    optimized = triton_static._make_ttir(str(path), GPUTarget("cuda", 90, 32), triton_static.compile_options(warps, stages))
    accumulator_adds = lambda ir: sum("arith.addf" in line and ": tensor<64x512xf32>" in line for line in ir.splitlines())
    assert (accumulator_adds(ttir), accumulator_adds(optimized)) == (1, 0)


def test_tpu_aot_compiles_the_mosaic_kernels_for_a_tpu(tmp_path):
    """experiments.tpu_aot compiles Mosaic kernels with libtpu's compiler for a TPU v4 on this CPU machine (no TPU):
    among them the bf16 decode attention (its 2-row bf16 DMAs at even offsets failed Mosaic's tile-alignment check
    before it read the cache as 32-bit words) and the fp8 prefill indexer (v4's Mosaic rejects fp8 matmuls); and
    the tiny model's decode step, its indexer and attention on the Mosaic kernels. libtpu (the test extra's jax[tpu])
    has wheels for Linux x86-64 only."""
    pytest.importorskip("libtpu")
    out = tmp_path / "aot.json"
    kernels = ["sparse_mla_fwd", "sparse_mla_bwd", "indexer_fp8", "decode_indexer_fp8", "decode_mla"]
    proc = subprocess.run([sys.executable, "-m", "experiments.tpu_aot", f"--aot_out={out}", "--topologies=v4:2x2x1",
                           f"--kernels={','.join(kernels)}", "--model=tiny", "--model_steps=decode_step"],
                          check=False, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["device"]) for r in rows] == [(k, "TPU v4") for k in kernels + ["tiny/decode_step"]]
    assert all("error" not in r and r["code_bytes"] > 0 and r["kernels"] >= 1 for r in rows), rows
    # Every layer's decode indexer and attention (the tiny preset scans its layers: one call of each per body).
    assert rows[-1]["kernels"] >= 2, rows[-1]
    # The indexers select by sort: no element gathers (select_topk compiled to 36 in the prefill merge, 42 in
    # decode), and the attention kernels gather rows by DMA, not in XLA.
    assert all(r["gathers"] == 0 for r in rows[:-1]), rows
