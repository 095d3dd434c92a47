"""Einsum: a projection whose weight carries logical axis names (Gemma-style).

Matmuls run in the compute dtype with float32 accumulation, then cast back.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Einsum(nn.Module):
    """Holds one weight of `shape` (logical `axes`); `__call__(eqn, x)` contracts x with it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, eqn: str, x: jnp.ndarray) -> jnp.ndarray:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"Einsum: shape {self.shape} and axes {self.axes} differ in rank")
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            self.shape,
            self.param_dtype,
        )
        y = jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)
        return y.astype(self.dtype)
