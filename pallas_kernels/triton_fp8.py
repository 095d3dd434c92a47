"""FP8 matmuls on Hopper's wgmma in Pallas' Triton lowering.

Pallas lowers `jnp.dot` to a `tt.dot` without `maxNumImpreciseAcc` (JAX 0.10 to 0.12). For an
fp8 x fp8 -> float32 dot Triton then refuses Hopper's wgmma, which it allows only where the tensor
core may sum at least 32 products in its own reduced-precision accumulator before each float32
promotion, and falls back to mma.sync on operands upcast to f16: FP8 inputs halve the bytes read
but never reach the FP8 tensor-core rate. Compiled offline for sm_90a (`experiments/triton_static.py`,
the indexer scores kernel at 4:64:8:2 on fp8 q and k): f16 mma.sync at 194 registers as lowered by
Pallas; fp8 wgmma at 139 registers with the attribute set.

`enable_fp8_wgmma()` wraps the Triton lowering rule of `lax.dot_general` so that every fp8 x fp8 ->
float32 dot gets maxNumImpreciseAcc = 128: up to 128 products per promotion, DeepGEMM's interval for
its FP8 GEMMs and the indexer's whole contraction (D = 128). Other dots are untouched. It changes a
process-wide table of an internal JAX module (`jax._src.pallas.triton.lowering`), once; the Triton
indexer kernels call it before building their pallas_calls, and
tests/pallas_kernels/test_triton_lowering.py checks the attribute reaches their Triton IR.
"""

import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering

PROMOTION_INTERVAL = 128  # fp8 products summed in the tensor core before each float32 add

_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def enable_fp8_wgmma():
    """Makes the Triton lowering mark fp8 x fp8 -> float32 dots for wgmma (idempotent; module docstring)."""
    rule = lowering.triton_lowering_rules[lax.dot_general_p]
    if getattr(rule, "fp8_wgmma", False):
        return

    def dot_general(ctx, a, b, **params):
        out = rule(ctx, a, b, **params)
        (a_aval, b_aval), (out_aval,) = ctx.avals_in, ctx.avals_out
        if a_aval.dtype in _FP8 and b_aval.dtype in _FP8 and out_aval.dtype == jnp.float32:
            dot = out.owner  # float32 out: the dot's own result, no cast after it
            if dot.name != "tt.dot":
                raise NotImplementedError(f"enable_fp8_wgmma: expected the fp8 dot's result from tt.dot, got {dot.name}")
            dot.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32),
                                                                      PROMOTION_INTERVAL)
        return out

    dot_general.fp8_wgmma = True
    lowering.triton_lowering_rules[lax.dot_general_p] = dot_general
