"""FP8 simulation of DeepSeek's indexer numerics (spec §3 steps 3-4, §11.14).

`quantize_e4m3` must reproduce DeepSeek's `act_quant` bit for bit (a torch oracle written from
the kernel's semantics); `hadamard_rotate` must be an orthogonal (Sylvester) rotation; and the
FP8 indexer path must select nearly the same keys as the exact path (≥ 90 %; DeepSeek's kernels
change a few % of the selection on tiny random models, spec §11.14).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deepseek_jax import ModelConfig, Transformer, fp8
from pallas_kernels import ops

BLOCK = 128
FP8_MAX = 448.0


# ----------------------------------------------------------------------------- torch oracle
def torch_act_quant(x: np.ndarray, ue8m0: bool):
    """DeepSeek's act_quant (inference/kernel.py) in torch: per 128-block along the last dim,
    amax = max(|x|, 1e-4); s = amax · float32(1/448); with ue8m0 s = 2^ceil(log2 s) from the
    float32 exponent bits (exponent + 1 unless the mantissa is zero); y = clamp(x / s, ±448)
    cast to float8_e4m3fn. Returns (y as uint8 bit patterns, float32 scales)."""
    xt = torch.from_numpy(np.array(x, np.float32))  # a writable copy
    n = xt.shape[-1]
    xb = xt.reshape(*xt.shape[:-1], n // BLOCK, BLOCK)
    amax = xb.abs().amax(dim=-1).clamp(min=1e-4)
    s = amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)
    if ue8m0:
        bits = s.view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127
        exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        s = ((exponent + 127) << 23).to(torch.int32).view(torch.float32)
    y = torch.clamp(xb / s[..., None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y.reshape(xt.shape).view(torch.uint8).numpy(), s.numpy()


def _inputs(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[3, 5, 256] float32 test inputs (two 128-blocks per row)."""
    shape = (3, 5, 2 * BLOCK)
    if kind.startswith("normal"):
        return (float(kind.split("_")[1]) * rng.normal(size=shape)).astype(np.float32)
    if kind == "pow2":
        # Exact powers of two; in x[0] and x[1] each block's amax is 448 · 2^m (or the float32
        # just below 448, times 2^m), for which amax · float32(1/448) is exactly 2^m: the
        # mantissa-zero edge of the ue8m0 rounding (no exponent increment).
        x = np.sign(rng.normal(size=shape)) * np.exp2(rng.integers(-20, 12, size=shape))
        below_448 = np.nextafter(np.float32(FP8_MAX), np.float32(0))
        for row, top in ((0, FP8_MAX), (1, below_448)):
            m = rng.integers(-12, 4, size=(shape[1], 1))
            x[row] = np.sign(x[row]) * np.exp2(rng.integers(-20, 8, size=shape[1:]) + m)  # < 448 · 2^m
            x[row, :, 5] = top * np.exp2(m[:, 0])
            x[row, :, 200] = -top * np.exp2(m[:, 0])
        return x.astype(np.float32)
    if kind == "wide_range":
        # Per-element magnitudes over 10 decades: e4m3 subnormals, underflow to 0, saturation.
        x = rng.normal(size=shape) * 10.0 ** rng.uniform(-7, 3, size=shape)
        x[2, 0] = 0.0  # all-zero blocks (amax clamp)
        return x.astype(np.float32)
    raise ValueError(kind)


KINDS = ["normal_1e-6", "normal_3e-5", "normal_1", "normal_1e3", "pow2", "wide_range"]


@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_e4m3_matches_deepseek_act_quant(kind, ue8m0, dtype):
    """quantize_e4m3 = DeepSeek's act_quant: bit-identical e4m3 values and equal scales."""
    rng = np.random.default_rng(KINDS.index(kind) + 10 * ue8m0)
    x = jnp.asarray(_inputs(kind, rng), dtype)
    x32 = np.asarray(x.astype(jnp.float32))  # the bf16 values, exactly, in float32

    y, s = jax.jit(lambda v: fp8.quantize_e4m3(v, ue8m0=ue8m0))(x)
    assert y.dtype == jnp.float8_e4m3fn and y.shape == x.shape
    assert s.dtype == jnp.float32 and s.shape == x.shape[:-1] + (x.shape[-1] // BLOCK,)
    ref_y, ref_s = torch_act_quant(x32, ue8m0)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), ref_y)

    s = np.asarray(s)
    if kind == "pow2":  # the inputs do reach the mantissa-zero edge of the ue8m0 rounding
        exact = np.abs(x32.reshape(x32.shape[:-1] + (-1, BLOCK))).max(-1) * np.float32(1.0 / FP8_MAX)
        assert ((exact.view(np.uint32) & 0x7FFFFF) == 0).sum() >= 10
    if ue8m0:  # ue8m0 scales are exact powers of two
        assert (s.view(np.uint32) & 0x7FFFFF == 0).all()
        np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
    # Dequantised values are within e4m3 rounding (2^-4 relative, 2^-10 · s for subnormals).
    back = np.asarray(fp8.dequantize_e4m3(y, jnp.asarray(s)))
    tol = 2.0**-4 * np.abs(x32) + 2.0**-10 * np.repeat(s, BLOCK, axis=-1)
    assert (np.abs(back - x32) <= tol * (1 + 1e-6)).all()


def test_quantize_e4m3_rejects_partial_block():
    """The last dim must be a whole number of 128-blocks."""
    with pytest.raises(ValueError):
        fp8.quantize_e4m3(jnp.ones((2, 100)))


# ----------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 256])
def test_hadamard_matrix(n):
    """Sylvester order: H[i, j] = (-1)^popcount(i & j), and H Hᵀ = n I exactly."""
    h = fp8.hadamard_matrix(n)
    i, j = np.indices((n, n))
    popcount = np.vectorize(lambda v: bin(v).count("1"))(i & j)
    np.testing.assert_array_equal(h, (-1.0) ** popcount)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [0, -4, 3, 6, 12, 100, 129])
def test_hadamard_non_power_of_two_raises(n):
    """hadamard_matrix (and so hadamard_rotate) rejects sizes that are not powers of two."""
    with pytest.raises(ValueError):
        fp8.hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError):
            fp8.hadamard_rotate(jnp.ones((2, n)))


@pytest.mark.parametrize("n", [16, 128])
def test_hadamard_rotate_is_orthogonal(n):
    """hadamard_rotate preserves dot products and is its own inverse (H/√n is symmetric
    orthogonal)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(4, 9, n)).astype(np.float32)
    rx = np.asarray(fp8.hadamard_rotate(jnp.asarray(x)))
    assert rx.dtype == np.float32 and rx.shape == x.shape
    flat, rflat = x.reshape(-1, n).astype(np.float64), rx.reshape(-1, n).astype(np.float64)
    gram, rgram = flat @ flat.T, rflat @ rflat.T
    norms = np.linalg.norm(flat, axis=1)
    # rtol 1e-5, relative to each dot product's natural scale |x||y| (near-zero dots included)
    assert (np.abs(rgram - gram) <= 1e-5 * np.outer(norms, norms)).all()
    np.testing.assert_allclose(np.diag(rgram), np.diag(gram), rtol=1e-5)
    # A real rotation, not the identity or a permutation.
    assert np.abs(rx - x).max() > 0.5
    twice = np.asarray(fp8.hadamard_rotate(jnp.asarray(rx)))
    np.testing.assert_allclose(twice, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())


# ----------------------------------------------------------------------------- FP8 vs exact selection
def _overlap(a, b):
    """Per row, |A ∩ B| / |A| of two index sets, ignoring -1 slots; both rows must hold the
    same number of valid indices."""
    a = np.asarray(a).reshape(-1, a.shape[-1])
    b = np.asarray(b).reshape(-1, b.shape[-1])
    out = np.empty(len(a))
    for r, (x, y) in enumerate(zip(a, b)):
        x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
        assert len(x) == len(y) > 0
        out[r] = len(x & y) / len(x)
    return out


def test_fp8_indexer_topk_keeps_exact_selection():
    """Hadamard + e4m3/ue8m0 q and k (q scale folded into w, k scale passed to the kernel)
    select ≥ 90 % of the keys the exact float32 scores select (random q, k, w)."""
    rng = np.random.default_rng(0)
    b, t, h, s, topk = 2, 32, 16, 128, 16
    q = rng.normal(size=(b, t, h, 128)).astype(np.float32)
    k = rng.normal(size=(b, s, 128)).astype(np.float32)
    w = rng.normal(size=(b, t, h)).astype(np.float32)
    q_offset = s - 1  # every key visible to every query: no trivially complete rows

    @jax.jit
    def both(q, k, w):
        exact = ops.indexer_topk(q, k, w, topk=topk, q_offset=q_offset)
        q8, q_scale = fp8.quantize_e4m3(fp8.hadamard_rotate(q))
        k8, k_scale = fp8.quantize_e4m3(fp8.hadamard_rotate(k))
        assert q_scale.shape == (b, t, h, 1) and k_scale.shape == (b, s, 1)
        approx = ops.indexer_topk(q8, k8, w * q_scale[..., 0], k_scale=k_scale[..., 0], topk=topk,
                                  q_offset=q_offset)
        return exact, approx

    exact, approx = both(q, k, w)
    overlap = _overlap(exact, approx)
    print(f"direct FP8 indexer: mean overlap {overlap.mean():.4f}, rows differing {(overlap < 1).mean():.3f}")
    assert overlap.mean() >= 0.90
    assert (overlap < 1).any()  # the FP8 path really is quantised (not the exact path again)


def test_fp8_indexer_in_model_keeps_exact_selection():
    """With the same params, the index_fp8 model selects ≥ 90 % of the exact model's keys in the
    first layer (whose inputs are identical in both runs); later layers are printed only."""
    cfg = ModelConfig.preset("tiny", index_fp8=True, index_head_dim=128, index_n_heads=8, index_topk=16,
                             num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    exact_cfg = cfg.replace(index_fp8=False)
    assert cfg.dtype == "float32" and cfg.index_n_heads >= 8
    b, t = 2, 64
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens[:, :8])["params"]

    def indices(c, p, x):
        _, aux = Transformer(c).apply({"params": p}, x, return_indices=True, attention="sparse", with_mtp=False)
        return aux["indices"]

    fp8_idx, exact_idx = jax.jit(lambda p, x: (indices(cfg, p, x), indices(exact_cfg, p, x)))(params, tokens)
    first = "dense_layers" if cfg.first_k_dense_replace > 0 else "moe_layers"
    assert set(fp8_idx) == set(exact_idx) and first in fp8_idx

    results = {}
    for group in ("dense_layers", "moe_layers"):
        for layer in range(fp8_idx[group].shape[0] if group in fp8_idx else 0):
            a, e = fp8_idx[group][layer], exact_idx[group][layer]
            assert a.shape == (b, t, cfg.index_topk)
            overlap = _overlap(a, e).reshape(b, t)
            nontrivial = overlap[:, cfg.index_topk:]  # rows with more valid keys than topk
            results[(group, layer)] = (overlap.mean(), nontrivial.mean(), (nontrivial < 1).mean())
            print(f"{group}[{layer}]: mean overlap {overlap.mean():.4f} (rows t >= topk: "
                  f"{nontrivial.mean():.4f}, {100 * (nontrivial < 1).mean():.0f} % of them differ)")

    all_rows, nontrivial, _ = results[(first, 0)]
    assert all_rows >= 0.90
    assert nontrivial >= 0.90  # also on the rows where the selection is a real choice
    assert nontrivial < 1.0    # the FP8 path really changed something
