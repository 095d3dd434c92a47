"""The Triton kernels lower for CUDA on this CPU machine, at V3.2-like shapes with the default tiles.

`jax.export` for the "cuda" platform runs Pallas's Triton lowering (kernel body -> Triton IR,
serialized into a `__gpu$xla.gpu.triton` custom call) without a GPU, so a primitive the
lowering does not support fails here rather than on the device. Not covered: Triton's own
compilation to PTX (shared memory and register limits), which only a GPU run exercises.
Tracing only: nothing executes, so real sizes cost little.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.indexer.triton import indexer_topk_triton
from pallas_kernels.sparse_mla import triton as sparse_mla_triton

TRITON_CALL = "__gpu$xla.gpu.triton"
sd = jax.ShapeDtypeStruct
B, T, S, H, K = 1, 8, 4096, 128, 2048  # attention heads, selected rows
HI, DI = 64, 128                        # indexer heads x dim
Q, KV, IDX = sd((B, T, H, 576), jnp.bfloat16), sd((B, S, 576), jnp.bfloat16), sd((B, T, K), jnp.int32)
OUT, LSE = sd((B, T, H, 512), jnp.bfloat16), sd((B, T, H), jnp.float32)
KERNELS = {
    "sparse_mla_fwd": (lambda *a: sparse_mla_triton.sparse_mla_fwd(*a, scale=576**-0.5, v_dim=512), (Q, KV, IDX)),
    "sparse_mla_bwd": (lambda *a: sparse_mla_triton.sparse_mla_bwd(*a, scale=576**-0.5, v_dim=512),
                       (Q, KV, IDX, OUT, LSE, OUT)),
    # Scores kernel + select_topk (plain XLA) over one chunk of queries.
    "indexer_topk": (lambda *a: indexer_topk_triton(*a, topk=K),
                     (sd((B, T, HI, DI), jnp.bfloat16), sd((B, S, DI), jnp.bfloat16), sd((B, T, HI), jnp.float32))),
    "indexer_topk_fp8": (lambda q, k, w, ks: indexer_topk_triton(q, k, w, topk=K, k_scale=ks),
                         (sd((B, T, HI, DI), jnp.float8_e4m3fn), sd((B, S, DI), jnp.float8_e4m3fn),
                          sd((B, T, HI), jnp.float32), sd((B, S), jnp.float32))),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_cuda(name):
    fn, args = KERNELS[name]
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",),
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    assert exported.platforms == ("cuda",)
    assert exported.mlir_module().count(TRITON_CALL) == 1
