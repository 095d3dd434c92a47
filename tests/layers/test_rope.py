"""YaRN frequencies and the two RoPE layouts (spec §2, §3, §11.1)."""

import math

import jax.numpy as jnp
import numpy as np

from deepseek_jax import ModelConfig
from deepseek_jax.layers.rope import apply_rope_half, apply_rope_interleaved, rope_cos_sin, rope_frequencies


def test_official_yarn_table():
    """i <= 10 unchanged, i >= 23 divided by 40, a linear blend in between (low=10, high=23)."""
    cfg = ModelConfig.preset("v32-671b")
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    ratio = rope_frequencies(cfg) / base
    np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ratio[23:], 1 / 40, rtol=1e-5)
    ramp = (np.arange(11, 23) - 10) / 13
    np.testing.assert_allclose(ratio[11:23], (1 - ramp) + ramp / 40, rtol=1e-5)


def _complex_rotate(pairs_re, pairs_im, angles):
    z = (pairs_re + 1j * pairs_im) * np.exp(1j * angles)
    return z.real, z.imag


def test_layouts_match_complex_rotation():
    """Interleaved rotates (x[2i], x[2i+1]); half-split rotates (x[i], x[i+R/2]); same angles."""
    cfg = ModelConfig.preset("tiny")
    r = cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, r)).astype(np.float32)
    positions = jnp.asarray(rng.integers(0, 200, size=(2, 5)))
    cos, sin = rope_cos_sin(positions, cfg)
    angles = np.asarray(positions)[..., None, None] * rope_frequencies(cfg)  # [B, T, 1, F]

    re, im = _complex_rotate(x[..., 0::2], x[..., 1::2], angles)
    expected = np.stack([re, im], -1).reshape(x.shape)
    np.testing.assert_allclose(apply_rope_interleaved(jnp.asarray(x), cos, sin), expected, atol=2e-5)

    re, im = _complex_rotate(x[..., : r // 2], x[..., r // 2:], angles)
    np.testing.assert_allclose(apply_rope_half(jnp.asarray(x), cos, sin), np.concatenate([re, im], -1), atol=2e-5)


def test_scores_depend_on_relative_position_only():
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, cfg.qk_rope_head_dim)).astype(np.float32)) for _ in range(2))

    def score(m, n, rope):
        cq, sq = rope_cos_sin(jnp.array([[m]]), cfg)
        ck, sk = rope_cos_sin(jnp.array([[n]]), cfg)
        return float(jnp.sum(rope(q, cq, sq) * rope(k, ck, sk)))

    for rope in (apply_rope_interleaved, apply_rope_half):
        assert math.isclose(score(7, 3, rope), score(107, 103, rope), rel_tol=1e-4)


def test_attention_factor_applies_to_cos_sin():
    """mscale != mscale_all_dim scales cos/sin by their YaRN ratio, as HF/DeepSeek's HF code."""
    cfg = ModelConfig.preset("tiny", rope_mscale=1.0, rope_mscale_all_dim=0.5)
    cos, sin = rope_cos_sin(jnp.arange(4)[None], cfg)
    expected = (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)
    np.testing.assert_allclose(cos**2 + sin**2, expected**2, rtol=1e-6)
