"""Rotary embeddings with YaRN (spec §2): one frequency table, two layouts.

MLA rotates *interleaved* pairs (x[2i], x[2i+1]); the lightning indexer rotates the
*half-split* pairs (x[i], x[i + d/2]) (the fixed V3.2 indexer, spec §11.1). Both use the
same YaRN frequencies. YaRN's cos/sin factor mscale(mscale)/mscale(mscale_all_dim) is 1 for
the official config; the m^2 of the softmax scale lives in `ModelConfig.softmax_scale`.

Shapes: T positions, R = qk_rope_head_dim, F = R/2 frequencies.
"""

import math

import jax.numpy as jnp
import numpy as np


def rope_frequencies(cfg) -> np.ndarray:
    """Inverse frequencies [F] (float32), YaRN-blended when cfg.rope_type == 'yarn'."""
    dim = cfg.qk_rope_head_dim
    pos_freqs = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type != "yarn":
        return inv_freq

    def correction_dim(rotations):
        orig = cfg.rope_original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1.0 - ramp  # 1: original frequency (extrapolate), 0: divided by factor (interpolate)
    interpolated = (1.0 / (np.float32(cfg.rope_factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - keep) + inv_freq * keep).astype(np.float32)


def rope_attention_factor(cfg) -> float:
    """YaRN's cos/sin scale (1.0 when mscale == mscale_all_dim, as in the official config)."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return cfg.yarn_mscale(cfg.rope_mscale) / cfg.yarn_mscale(cfg.rope_mscale_all_dim)
    return cfg.yarn_mscale(1.0)


def rope_cos_sin(positions: jnp.ndarray, cfg) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape positions.shape + [F], float32."""
    inv_freq = jnp.asarray(rope_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def _expand(cs: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[B, T, F] -> broadcastable against x [B, T, (H,) R]."""
    return cs.reshape(cs.shape[:2] + (1,) * (x.ndim - 3) + cs.shape[2:])


def apply_rope_interleaved(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates pairs (x[2i], x[2i+1]) by angle i; x [B, T, ..., R], cos/sin [B, T, F]."""
    cos, sin = _expand(cos, x), _expand(sin, x)
    x32 = x.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    y = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return y.reshape(x.shape).astype(x.dtype)


def apply_rope_half(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates pairs (x[i], x[i + R/2]) by angle i; x [B, T, ..., R], cos/sin [B, T, F]."""
    cos, sin = _expand(cos, x), _expand(sin, x)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)
