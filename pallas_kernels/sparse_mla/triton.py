"""Sparse MLA attention forward as a Pallas kernel with the Triton lowering (GPU).

One program per (query token, block of heads). It walks the query's selected rows in blocks
of `block_k`: gathers their latent [c_kv] and RoPE [k_rope] parts straight from HBM by index
(the rows are shared by every head, so a head block amortises each gather), scores
q_nope·c_kv + q_rope·k_rope, and keeps an online softmax with a float32 accumulator. It writes
the output and the log-sum-exp (for a backward pass). Unused slots (-1) are skipped by masking.

Triton wants power-of-two tiles of at least 16, so the wrapper pads the head, latent and RoPE
dims (zeros change no dot product) and the top-k axis (with -1), and flattens the batch into
the row index. Reference: `pallas_kernels/sparse_mla/reference.py`. Default tiles (32 heads x
64 rows, 4 warps, 2 stages) were the fastest of a sweep on an H200 (experiments/bench_kernels.py):
~226 TFLOP/s at V3.2 shapes (H=128, k=2048), T=16K.

Shapes: B batch, T queries, S keys, H heads, V latent/value dim (512), R RoPE dim (64),
K selected rows per query.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _next_pow2(n, minimum=16):
    return max(minimum, 1 << (int(n) - 1).bit_length())


def _kernel(idx_ref, qn_ref, qr_ref, kvn_ref, kvr_ref, o_ref, lse_ref, *, scale, block_k, num_k_blocks):
    qn, qr = qn_ref[...], qr_ref[...]
    block_h, v = qn.shape

    def body(i, carry):
        m, l, acc = carry
        idx = idx_ref[pl.ds(i * block_k, block_k)]
        used = idx >= 0
        rows = jnp.where(used, idx, 0)
        kn = kvn_ref[rows, :]  # [block_k, V] gathered rows
        kr = kvr_ref[rows, :]  # [block_k, R]
        s = (jnp.dot(qn, kn.T, preferred_element_type=jnp.float32)
             + jnp.dot(qr, kr.T, preferred_element_type=jnp.float32))
        s = jnp.where(used[None, :], s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift[:, None])
        alpha = jnp.exp(m - shift)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(kn.dtype), kn, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((block_h, v), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "block_h", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def sparse_mla_fwd(q, kv, indices, *, scale, v_dim, block_h=32, block_k=64, num_warps=4, num_stages=2,
                   interpret=False):
    """q [B,T,H,D], kv [B,S,D], indices [B,T,K] -> (out [B,T,H,v_dim] in q's dtype, lse [B,T,H] f32)."""
    b, t, h, d = q.shape
    s, k = kv.shape[1], indices.shape[-1]
    r = d - v_dim
    vp, rp = _next_pow2(v_dim), _next_pow2(r)
    block_h = min(block_h, _next_pow2(h))
    hp = -(-h // block_h) * block_h
    kp = -(-k // block_k) * block_k

    def split(x, heads):  # [..., D] -> latent [..., Vp], rope [..., Rp]
        pad = [(0, 0)] * (x.ndim - 1)
        return (jnp.pad(x[..., :v_dim], pad + [(0, vp - v_dim)]), jnp.pad(x[..., v_dim:], pad + [(0, rp - r)]))

    qn, qr = split(jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0))), hp)
    qn, qr = qn.reshape(b * t, hp, vp), qr.reshape(b * t, hp, rp)
    kvn, kvr = split(kv, None)
    kvn, kvr = kvn.reshape(b * s, vp), kvr.reshape(b * s, rp)
    rows = jnp.where(indices >= 0, indices + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
    rows = jnp.pad(rows.reshape(b * t, k), ((0, 0), (0, kp - k)), constant_values=-1).astype(jnp.int32)

    kernel = functools.partial(_kernel, scale=scale, block_k=block_k, num_k_blocks=kp // block_k)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b * t, hp // block_h),
        in_specs=[
            pl.BlockSpec((None, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((None, block_h, vp), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, block_h, rp), lambda i, j: (i, j, 0)),
            pl.BlockSpec((b * s, vp), lambda i, j: (0, 0)),
            pl.BlockSpec((b * s, rp), lambda i, j: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_h, vp), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, block_h), lambda i, j: (i, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b * t, hp, vp), q.dtype), jax.ShapeDtypeStruct((b * t, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_mla_fwd",
    )(rows, qn, qr, kvn, kvr)
    out = out.reshape(b, t, hp, vp)[:, :, :h, :v_dim]
    return out, lse.reshape(b, t, hp)[:, :, :h]
