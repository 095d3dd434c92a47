"""Projection weights with logical axis names, optionally stored in FP8 (Gemma-style Einsum).

`weight()` declares one weight [lead..., in..., out...]. Normally it is a plain array in
`param_dtype`. With `fp8`, it is stored as e4m3 values plus float32 scales, one per 128x128
block of its [in, out] matrix view (the block layout of DeepSeek's checkpoints, transposed);
it is dequantised at use, so parameters cost ~1 byte each (spec §7). `Einsum` contracts an
input with such a weight in the compute dtype with float32 accumulation.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.fp8 import E4M3_MAX

BLOCK = 128


def scale_shape(shape, n_in, n_lead=0):
    """Block-scale shape [lead..., ceil(in/128), ceil(out/128)] of a weight [lead..., in..., out...]."""
    lead, rest = shape[:n_lead], shape[n_lead:]
    return tuple(lead) + (-(-math.prod(rest[:n_in]) // BLOCK), -(-math.prod(rest[n_in:]) // BLOCK))


def dequantize_kernel(kernel, scale, *, n_in, n_lead=0, dtype=jnp.float32):
    """e4m3 kernel [lead..., in..., out...] × its block scales -> dtype."""
    lead, rest = kernel.shape[:n_lead], kernel.shape[n_lead:]
    rows, cols = math.prod(rest[:n_in]), math.prod(rest[n_in:])
    expanded = jnp.repeat(jnp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)[..., :rows, :cols]
    w = kernel.reshape(lead + (rows, cols)).astype(jnp.float32) * expanded
    return w.reshape(kernel.shape).astype(dtype)


def _init_scale(std):
    """Power-of-two block scale that puts ~3 std of a fresh normal init at e4m3's max."""
    return float(2.0 ** math.ceil(math.log2(3 * std / E4M3_MAX)))


def weight(module: nn.Module, name: str, shape, axes, *, std, param_dtype, dtype, n_in=1, n_lead=0, fp8=False):
    """Declares `name` (and `name + "_scale"` with fp8) on `module`; returns it in `dtype`."""
    if len(shape) != len(axes):
        raise ValueError(f"weight {name}: shape {shape} and axes {axes} differ in rank")
    if not fp8:
        w = module.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), axes), shape, param_dtype)
        return w.astype(dtype)
    s = _init_scale(std)

    def init_kernel(key, shape, _):
        w = jax.random.normal(key, shape, jnp.float32) * (std / s)
        return jnp.clip(w, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)

    kernel = module.param(name, nn.with_logical_partitioning(init_kernel, axes), shape, jnp.float8_e4m3fn)
    scale_axes = tuple(axes[:n_lead]) + ("fp8_block_in", "fp8_block_out")
    scale = module.param(name + "_scale", nn.with_logical_partitioning(nn.initializers.constant(s), scale_axes),
                         scale_shape(shape, n_in, n_lead), jnp.float32)
    return dequantize_kernel(kernel, scale, n_in=n_in, n_lead=n_lead, dtype=dtype)


class Einsum(nn.Module):
    """Holds one weight of `shape` (logical `axes`, `n_in` leading input dims); `__call__(eqn, x)`
    contracts x with it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    n_in: int = 1
    fp8: bool = False

    @nn.compact
    def __call__(self, eqn: str, x: jnp.ndarray) -> jnp.ndarray:
        w = weight(self, "kernel", self.shape, self.axes, std=self.init_std, param_dtype=self.param_dtype,
                   dtype=self.dtype, n_in=self.n_in, fp8=self.fp8)
        y = jnp.einsum(eqn, x.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


