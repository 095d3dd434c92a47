"""FP8 simulation of DeepSeek's indexer numerics (spec §3, steps 3-4; §11.14).

`hadamard_rotate` is the orthogonal Sylvester-Hadamard rotation v·H/sqrt(n) that DeepSeek applies
to indexer q and k before quantising (it spreads outliers, changes no dot product).
`quantize_e4m3` is DeepSeek's `act_quant`: one scale per 128 channels, amax clamped at 1e-4,
scale = amax/448 rounded *up* to a power of two (ue8m0) when `ue8m0`, values
clip(x/scale, ±448) rounded to e4m3 (round-to-nearest-even).
"""

import jax
import jax.numpy as jnp
import numpy as np

E4M3_MAX = 448.0


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester-Hadamard matrix of order n (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n: expected a power of two, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_rotate(x: jnp.ndarray) -> jnp.ndarray:
    """x·H/sqrt(n) over the last axis, computed in float32, returned in x's dtype."""
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n) / np.sqrt(n, dtype=np.float32))
    y = jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _pow2_ceil(v: jnp.ndarray) -> jnp.ndarray:
    """2^ceil(log2(v)) for positive normal float32 v, by exponent bits as DeepSeek's kernel."""
    bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127
    exponent = exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(((exponent + 127) << 23).astype(jnp.uint32), jnp.float32)


def quantize_e4m3(x: jnp.ndarray, *, block: int = 128, ue8m0: bool = True):
    """Returns (values as float8_e4m3fn [..., n], float32 scales [..., n // block])."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"quantize_e4m3: last dim {n} is not a multiple of block {block}")
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (n // block, block))
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), 1e-4)
    scale = amax * jnp.float32(1.0 / E4M3_MAX)
    if ue8m0:
        scale = _pow2_ceil(scale)
    y = jnp.clip(xb / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return y.reshape(x.shape), scale


def dequantize_e4m3(y: jnp.ndarray, scale: jnp.ndarray, *, block: int = 128) -> jnp.ndarray:
    """Inverse of `quantize_e4m3` up to its rounding: float32 values."""
    n = y.shape[-1]
    yb = y.astype(jnp.float32).reshape(y.shape[:-1] + (n // block, block))
    return (yb * scale[..., None]).reshape(y.shape)
