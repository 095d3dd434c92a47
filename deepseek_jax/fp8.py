"""FP8 simulation of DeepSeek's indexer numerics (spec §3, steps 3-4; §11.14).

`hadamard_rotate` is the orthogonal Sylvester-Hadamard rotation v·H/sqrt(n) that DeepSeek applies
to indexer q and k before quantising (it spreads outliers, changes no dot product).
`quantize_e4m3` is DeepSeek's `act_quant`: one scale per 128 channels, amax clamped at 1e-4,
scale = amax/448 rounded *up* to a power of two (ue8m0) when `ue8m0`, values
clip(x/scale, ±448) rounded to e4m3 (round-to-nearest-even).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
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


def dequantize_weight_blocks(w: np.ndarray, scale_inv: np.ndarray, *, block: int = 128) -> np.ndarray:
    """DeepSeek's checkpoint rule W[r, c] = W_fp8[r, c] · scale_inv[r // 128, c // 128] (float32, host)."""
    rows, cols = w.shape
    expanded = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:rows, :cols]
    return w.astype(np.float32) * expanded


def quantize_weight_blocks(w: np.ndarray, *, block: int = 128, ue8m0: bool = True):
    """Our block quantiser for [out, in] weights: one scale per 128x128 block (partial edge blocks
    use their own amax), e4m3 values; returns (float8_e4m3fn weights, float32 scale_inv)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = np.zeros((nr * block, nc * block), np.float32)
    padded[:rows, :cols] = w.astype(np.float32)
    blocks = padded.reshape(nr, block, nc, block)
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4)
    scale = amax * np.float32(1.0 / E4M3_MAX)
    if ue8m0:  # 2^ceil(log2(scale)) from the exponent bits, as `_pow2_ceil`
        bits = scale.astype(np.float32).view(np.uint32)
        exponent = ((bits >> 23) & 0xFF).astype(np.int64) + ((bits & 0x7FFFFF) != 0)
        scale = (exponent.astype(np.uint32) << 23).view(np.float32)
    q = np.clip(blocks / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).reshape(padded.shape)
    return q[:rows, :cols].astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)
