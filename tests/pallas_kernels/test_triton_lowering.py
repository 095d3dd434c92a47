"""The Triton kernels lower for CUDA on this CPU machine, at V3.2-like shapes with the default tiles.

`jax.export` for the "cuda" platform (`triton_lowering.export_for_cuda`: for an H200, named by an
abstract mesh since JAX 0.11) runs Pallas's Triton lowering (kernel body -> Triton IR, serialized
into a `__gpu$xla.gpu.triton` custom call) without a GPU, so a primitive the lowering does not
support fails here rather than on the device. Triton's own compilation to
PTX and SASS (shared memory and register limits) is the triton_static smoke test's
(tests/experiments/test_benchmarks.py), with pip's Triton rather than XLA's.
Tracing only: nothing executes, so real sizes cost little.

The decode indexer at V3.2 decode shapes (B = 64 sequences, T = 1 or 2 queries, S = 128K cached
keys, and S - 3 where the last key block's loads are masked; a stacked cache of L = 2 layers, bf16
and fp8; one key block per program or 8 in a pipelined loop) also reads the cache in place: no
dynamic-slice of a layer appears in the module, except where an fp8 cache of 2-4 GiB makes it
fall back to a copy of the layer (32-bit offsets). The prefill indexer runs the batch in groups
where an fp8 query chunk or k of 2-4 GiB would overflow them: no fp8 operand of a Triton call
lies in that range. The prefill indexer's key-loop variant lowers at B = 1, a 512-query chunk,
S = 64K keys (bf16 and fp8). At T = S = 64K the prefill indexer calls its scores kernel once per
causal run, each with only the keys that run sees. The top-k kernel (`select_topk_triton`) lowers
on a [512, 64K] block of scores, and behind the prefill and decode indexers (`topk_kernel=True`).
The indexers' fp8 dots reach the Triton IR marked for Hopper's fp8 wgmma and the backward's atomic
adds relaxed (`triton_lowering`); interpreted, atomic adds at repeated indices all land. Float32 dots
are TF32 at JAX's default matmul precision and IEEE under "highest".
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments.triton_static import triton_kernels
from pallas_kernels.indexer.triton import indexer_scores_triton, indexer_topk_triton
from pallas_kernels.indexer.triton_decode import indexer_topk_decode_triton
from pallas_kernels.sparse_mla import triton as sparse_mla_triton
from pallas_kernels.topk_triton import select_topk_triton
from pallas_kernels.triton_lowering import (
    TRITON_CALL,
    exact_interpreted_atomic_adds,
    export_for_cuda,
)

sd = jax.ShapeDtypeStruct
B, T, S, H, K = 1, 8, 4096, 128, 2048  # attention heads, selected rows
HI, DI = 64, 128                        # indexer heads x dim
Q, KV, IDX = sd((B, T, H, 576), jnp.bfloat16), sd((B, S, 576), jnp.bfloat16), sd((B, T, K), jnp.int32)
OUT, LSE = sd((B, T, H, 512), jnp.bfloat16), sd((B, T, H), jnp.float32)
KERNELS = {
    "sparse_mla_fwd": (lambda *a: sparse_mla_triton.sparse_mla_fwd(*a, scale=576**-0.5, v_dim=512), (Q, KV, IDX)),
    "sparse_mla_fwd_v_split": (lambda *a: sparse_mla_triton.sparse_mla_fwd(*a, scale=576**-0.5, v_dim=512, block_h=64,
                                                                           block_k=32, num_warps=8, v_split=2),
                               (Q, KV, IDX)),
    "sparse_mla_bwd": (lambda *a: sparse_mla_triton.sparse_mla_bwd(*a, scale=576**-0.5, v_dim=512),
                       (Q, KV, IDX, OUT, LSE, OUT)),
    "sparse_mla_bwd_split_dkv": (lambda *a: sparse_mla_triton.sparse_mla_bwd(*a, scale=576**-0.5, v_dim=512,
                                                                             split_dkv=True),
                                 (Q, KV, IDX, OUT, LSE, OUT)),
    # The grid scores kernel + select_topk (plain XLA) over one chunk of queries, the last T of S (q_offset = S - T):
    # they see all S keys.
    "indexer_topk": (lambda *a: indexer_topk_triton(*a, topk=K, q_offset=S - T, key_loop=False, topk_kernel=False),
                     (sd((B, T, HI, DI), jnp.bfloat16), sd((B, S, DI), jnp.bfloat16), sd((B, T, HI), jnp.float32))),
    "indexer_topk_fp8": (lambda q, k, w, ks: indexer_topk_triton(q, k, w, topk=K, k_scale=ks, q_offset=S - T,
                                                                 key_loop=False, topk_kernel=False),
                         (sd((B, T, HI, DI), jnp.float8_e4m3fn), sd((B, S, DI), jnp.float8_e4m3fn),
                          sd((B, T, HI), jnp.float32), sd((B, S), jnp.float32))),
}
DB, DS = 64, 131072  # decode: sequences, cached keys
PT, PS = 512, 65536  # prefill indexer: the last chunk of queries (indexer_topk_triton's default) against S keys


def key_loop_case(dtype):
    """The key-loop prefill indexer (one program per query tile, a traced-count loop over the key blocks) + select_topk."""
    args = (sd((B, PT, HI, DI), dtype), sd((B, PS, DI), dtype), sd((B, PT, HI), jnp.float32), sd((B, PS), jnp.float32))
    return lambda q, k, w, ks: indexer_topk_triton(q, k, w, topk=K, k_scale=ks, q_offset=PS - PT, key_loop=True,
                                                   topk_kernel=False), args


KERNELS |= {"indexer_topk_key_loop": key_loop_case(jnp.bfloat16),
            "indexer_topk_key_loop_fp8": key_loop_case(jnp.float8_e4m3fn),
            # The top-k as a kernel: one [chunk, S] scores block (sampled path), then behind the key-loop scores
            # kernel (the defaults).
            "select_topk_triton": (lambda x: select_topk_triton(x, K), (sd((PT, PS), jnp.float32),)),
            "indexer_topk_topk_kernel": (lambda *a: indexer_topk_triton(*a, topk=K, q_offset=PS - PT),
                                         (sd((B, PT, HI, DI), jnp.bfloat16), sd((B, PS, DI), jnp.bfloat16),
                                          sd((B, PT, HI), jnp.float32)))}


def decode_case(t, dtype, layers=2, topk_kernel=False, s=DS, **tiles):
    """The decode indexer (scores kernel + select_topk) on layer `layer` (traced) of a stacked cache of s keys."""
    scaled = dtype == jnp.float8_e4m3fn
    args = (sd((DB, t, HI, DI), dtype), sd((layers, DB, s, DI), dtype), sd((DB, t, HI), jnp.float32),
            sd((), jnp.int32), sd((DB, t), jnp.int32)) + ((sd((layers, DB, s), jnp.float32),) if scaled else ())
    return lambda q, k, w, layer, k_len, *ks: indexer_topk_decode_triton(q, k, w, layer, k_len, topk=K,
                                                                        k_scale=ks[0] if ks else None,
                                                                        topk_kernel=topk_kernel, **tiles), args


KERNELS |= {"indexer_topk_decode_t1": decode_case(1, jnp.bfloat16), "indexer_topk_decode_t2": decode_case(2, jnp.bfloat16),
            "indexer_topk_decode_fp8_t1": decode_case(1, jnp.float8_e4m3fn),
            "indexer_topk_decode_fp8_t2": decode_case(2, jnp.float8_e4m3fn),
            "indexer_topk_decode_topk_kernel": decode_case(1, jnp.bfloat16, topk_kernel=True),
            # A cache of no whole key blocks: the last block's loads are masked (an fp8 fill did not lower).
            "indexer_topk_decode_ragged": decode_case(1, jnp.bfloat16, s=DS - 3),
            "indexer_topk_decode_fp8_ragged": decode_case(1, jnp.float8_e4m3fn, s=DS - 3),
            # Key blocks in a pipelined loop, 8 per program.
            "indexer_topk_decode_key_loop": decode_case(2, jnp.bfloat16, blocks=8, num_stages=3),
            "indexer_topk_decode_key_loop_fp8_ragged": decode_case(1, jnp.float8_e4m3fn, s=DS - 3, blocks=8,
                                                                   num_stages=3)}


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
def test_fp8_indexer_dots_are_marked_for_wgmma(dtype):
    """The indexer kernels' fp8 x fp8 -> float32 dots carry maxNumImpreciseAcc (Triton's condition for Hopper's
    fp8 wgmma, else an f16 upcast on mma.sync: pallas_kernels/triton_lowering.py); bf16 dots do not."""
    grid = (lambda q, k, w, ks: indexer_topk_triton(q, k, w, topk=K, k_scale=ks, q_offset=S - T, key_loop=False),
            (sd((B, T, HI, DI), dtype), sd((B, S, DI), dtype), sd((B, T, HI), jnp.float32), sd((B, S), jnp.float32)))
    for fn, args in (grid, key_loop_case(dtype), decode_case(1, dtype)):
        dots = [line for ir, *_ in triton_kernels(fn, *args) for line in ir.splitlines() if "tt.dot " in line]
        assert dots and all(("maxNumImpreciseAcc = 128" in line) == (dtype == jnp.float8_e4m3fn) for line in dots), dots


@pytest.mark.parametrize("precision, attribute", [(None, "inputPrecision = tf32"), ("highest", None)])
def test_float32_dots_follow_the_default_matmul_precision(precision, attribute):
    """As XLA's on a GPU: float32 dots are TF32 at the default precision, IEEE float32 (no attribute) under
    jax.default_matmul_precision("highest") (what experiments/fuzz_kernels.py and gpu_check.sh's model part run)."""
    fn = lambda *a: sparse_mla_triton.sparse_mla_fwd(*a, scale=0.1, v_dim=64)
    args = (sd((1, 8, 16, 96), jnp.float32), sd((1, 300, 96), jnp.float32), sd((1, 8, 64), jnp.int32))
    with jax.default_matmul_precision(precision):
        dots = [line for ir, *_ in triton_kernels(fn, *args) for line in ir.splitlines() if "tt.dot " in line]
    assert dots and all((attribute in line) if attribute else ("inputPrecision" not in line) for line in dots), dots


def test_backward_atomic_adds_are_relaxed_and_only_there():
    """The sparse MLA backward's dkv atomic adds (fused and split forms) lower with relaxed semantics: acq_rel ones
    become MEMBAR + ATOM + L1 invalidation in SASS (pallas_kernels/triton_lowering.py). Another kernel's keep
    Pallas' acq_rel: the change is scoped by kernel name."""
    for name in ("sparse_mla_bwd", "sparse_mla_bwd_split_dkv"):
        fn, args = KERNELS[name]
        adds = [line for ir, *_ in triton_kernels(fn, *args) for line in ir.splitlines() if "tt.atomic_rmw" in line]
        assert adds and all("tt.atomic_rmw fadd, relaxed, gpu" in line for line in adds), adds

    def counter(x_ref, o_ref):
        plgpu.atomic_add(o_ref, (jnp.arange(16, dtype=jnp.int32),), x_ref[...])

    other = lambda x: pl.pallas_call(counter, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name="other",
                                     compiler_params=plgpu.CompilerParams(num_warps=4))(x)
    adds = [line for ir, *_ in triton_kernels(other, sd((16,), jnp.float32)) for line in ir.splitlines()
            if "tt.atomic_rmw" in line]
    assert adds and all("tt.atomic_rmw fadd, acq_rel, gpu" in line for line in adds), adds


def test_interpreted_atomic_adds_at_repeated_indices_all_land():
    """As on a GPU, where each lane's add is an atomic of its own: 6 lanes add into 3 elements (JAX's own
    discharge keeps one add per element); an add over a slice keeps JAX's rule."""
    exact_interpreted_atomic_adds()

    def kernel(i_ref, x_ref, o_ref):
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        plgpu.atomic_add(o_ref, (i_ref[...],), x_ref[...])
        plgpu.atomic_add(o_ref, (pl.ds(1, 2),), x_ref[:2])

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((3,), jnp.float32), interpret=True)(
        jnp.array([0, 2, 0, 1, 0, 2], jnp.int32), jnp.arange(1.0, 7.0))
    np.testing.assert_array_equal(out, [1 + 3 + 5, 4 + 1, 2 + 6 + 2])


def slices_the_cache(module, layers):
    """Whether XLA dynamic-slices a layer out of the stacked decode cache [layers, DB, DS, ...] (keys or scales).
    (Other dynamic slices are no copy of the cache: JAX 0.11 lowers cumsum, in select_topk, as a scan whose
    fallback body slices one column at a time.)"""
    return any("stablehlo.dynamic_slice" in line and re.search(rf"\(tensor<{layers}x{DB}x\d+x", line)
               for line in module.splitlines())


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_cuda(name):
    exported = export_for_cuda(*KERNELS[name])
    assert exported.platforms == ("cuda",)
    module = exported.mlir_module()
    assert module.count(TRITON_CALL) == (2 if "split_dkv" in name or name.endswith("topk_kernel") else 1)
    if "decode" in name:  # the layer is read inside the kernel: XLA slices nothing out of the cache
        assert not slices_the_cache(module, layers=2)


@pytest.mark.parametrize("key_loop", [False, True])
def test_prefill_causal_runs_score_only_visible_keys(key_loop):
    """T = S = 64K: 8 runs of query chunks, the scores kernel of each called with the keys its last query sees."""
    args = (sd((B, PS, HI, DI), jnp.bfloat16), sd((B, PS, DI), jnp.bfloat16), sd((B, PS, HI), jnp.float32))
    module = export_for_cuda(lambda q, k, w: indexer_topk_triton(q, k, w, topk=K, key_loop=key_loop), args).mlir_module()
    widths = [int(m) for m in re.findall(r"tensor<1x(\d+)x128xbf16>", "".join(
        line.rsplit("} : (", 1)[1].split(") ->")[0] for line in module.splitlines() if TRITON_CALL in line))]
    assert widths == [PS // 8 * i for i in range(1, 9)]


def test_decode_copies_the_layer_of_a_2_to_4_gib_fp8_cache():
    """3 fp8 layers at the decode shape: 3 GiB, addressed with 32-bit offsets, so the layer is sliced out."""
    module = export_for_cuda(*decode_case(1, jnp.float8_e4m3fn, layers=3)).mlir_module()
    assert slices_the_cache(module, layers=3) and module.count(TRITON_CALL) == 1


def fp8_operand_shapes(module):
    """Shapes of the fp8 operands of every Triton call in a lowered module, in operand order."""
    shapes = []
    for line in module.splitlines():
        if TRITON_CALL in line:
            operand_types = line.rsplit("} : (", 1)[1].split(") ->")[0]
            shapes += [tuple(map(int, dims.split("x"))) for dims in re.findall(r"tensor<([0-9x]+)xf8E4M3FN>", operand_types)]
    return shapes


def prefill_fp8_case(b, t, s, key_loop=False):
    """T queries after S - T cached tokens (q_offset = S - T): the last query sees all S keys."""
    args = (sd((b, t, HI, DI), jnp.float8_e4m3fn), sd((b, s, DI), jnp.float8_e4m3fn), sd((b, t, HI), jnp.float32),
            sd((b, s), jnp.float32))
    return lambda q, k, w, ks: indexer_topk_triton(q, k, w, topk=K, k_scale=ks, q_offset=s - t, key_loop=key_loop), args


@pytest.mark.parametrize("b, t, s, group", [
    (768, 512, 4096, 384),    # the query chunk [768, 512, 64, 128]: 3 GiB
    (192, 8, 131072, 96),     # k [192, 128K, 128]: 3 GiB
    (384, 8, 131072, 384),    # k of 6 GiB: 64-bit offsets, one call
])
@pytest.mark.parametrize("key_loop", [False, True])
def test_prefill_fp8_operands_stay_addressable(b, t, s, group, key_loop):
    """fp8 operands of 2-4 GiB (32-bit offsets overflow) reach the kernel in batch groups of <= 2^31 elements
    (the key-loop variant too: same operands, through the same wrapper)."""
    shapes = fp8_operand_shapes(export_for_cuda(*prefill_fp8_case(b, t, s, key_loop)).mlir_module())
    assert [shape[0] for shape in shapes] == [group, group]  # q's chunk, k
    assert all(math.prod(shape) <= 2**31 or math.prod(shape) > 2**32 for shape in shapes)


def test_prefill_refuses_one_fp8_key_row_of_2_to_4_gib():
    """k [1, S, 128] with S·128 just over 2^31: no batch split helps, so a clear ValueError (tracing only)."""
    fn, args = prefill_fp8_case(1, 8, 2**24 + 128)
    with pytest.raises(ValueError, match=r"one row of the keys k .*32-bit offsets"):
        jax.eval_shape(fn, *args)


def test_scores_kernel_refuses_an_fp8_operand_of_2_to_4_gib():
    q, k, w, ks = prefill_fp8_case(768, 512, 4096)[1]
    with pytest.raises(ValueError, match="fewer batch rows"):
        jax.eval_shape(lambda *a: indexer_scores_triton(*a, jnp.full((768,), 4096), jnp.arange(512)), q, k, w, ks)
