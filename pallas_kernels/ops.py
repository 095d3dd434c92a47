"""Public DSA entry points: `indexer_topk` and `sparse_mla` (their names and shapes are a contract).

`impl="reference"` is the pure-JAX reference; `impl="pallas"` the Pallas kernel (the Triton
lowering; interpreted on CPU or with `interpret=True`, for tests); `impl="auto"` picks the
kernel on GPU and the reference elsewhere. Kernels: sparse MLA forward and backward (a
`jax.custom_vjp`); indexer scores (top-k per query chunk by `lax.top_k`). Not yet:
decode-specialised variants, FP8 inputs to the indexer kernel, TPU (Mosaic) variants.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.indexer import triton as indexer_triton
from pallas_kernels.indexer.reference import indexer_topk_reference
from pallas_kernels.sparse_mla import triton as sparse_mla_triton
from pallas_kernels.sparse_mla.reference import sparse_mla_reference

_IMPLS = ("auto", "reference", "pallas")


def _check_impl(impl):
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")


def _use_kernel(impl, interpret):
    return impl == "pallas" or (impl == "auto" and (interpret or jax.default_backend() == "gpu"))


def indexer_topk(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, impl="auto", interpret=False,
                 chunk_size=256, key_block=4096):
    """Top-k keys of the lightning indexer.

    q [B, T, H, D], k [B, S, D], w [B, T, H] (float32; any q scale folded in), optional
    k_scale [B, S] (FP8 keys) -> int32 [B, T, topk] indices of the largest
    I[t, s] = k_scale[s] Σ_h w[t, h] relu(q[t, h]·k[s]) over s <= t + q_offset, s < k_len[b];
    -1 marks slots with no valid key. Ties: lowest index first.
    """
    _check_impl(impl)
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"indexer_topk: expected q [B,T,H,D], k [B,S,D], w [B,T,H]; got {q.shape}, {k.shape}, {w.shape}")
    if q.shape[-1] != k.shape[-1] or q.shape[:3] != w.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"indexer_topk: shapes disagree: q {q.shape}, k {k.shape}, w {w.shape}")
    # Indices carry no gradient; stopping it here keeps autodiff out of the kernel.
    q, k, w = jax.lax.stop_gradient((q, k, w))
    if _use_kernel(impl, interpret) and q.dtype != jnp.float8_e4m3fn:
        return indexer_triton.indexer_topk_triton(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=k_len,
                                                  interpret=interpret or jax.default_backend() == "cpu")
    return indexer_topk_reference(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=k_len,
                                  chunk_size=chunk_size, key_block=key_block)


def sparse_mla(q, kv, indices, *, scale, v_dim=512, impl="auto", interpret=False, chunk_size=256):
    """Attention over the selected latent rows.

    q [B, T, H, Dqk], kv [B, S, Dqk], indices [B, T, K] (-1 = unused) -> [B, T, H, v_dim], the
    values being kv[..., :v_dim]; softmax over the selected rows only.
    """
    _check_impl(impl)
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"sparse_mla: expected q [B,T,H,D], kv [B,S,D], indices [B,T,K]; got {q.shape}, {kv.shape}, {indices.shape}")
    if q.shape[-1] != kv.shape[-1] or q.shape[:2] != indices.shape[:2] or v_dim > kv.shape[-1]:
        raise ValueError(f"sparse_mla: shapes disagree: q {q.shape}, kv {kv.shape}, indices {indices.shape}, v_dim {v_dim}")
    if _use_kernel(impl, interpret):
        # Pallas kernels compile only for accelerators; on CPU the kernel runs interpreted.
        return _sparse_mla_kernel(q, kv, indices, scale, v_dim, interpret or jax.default_backend() == "cpu")
    return sparse_mla_reference(q, kv, indices, scale=scale, v_dim=v_dim, chunk_size=chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sparse_mla_kernel(q, kv, indices, scale, v_dim, interpret):
    return sparse_mla_triton.sparse_mla_fwd(q, kv, indices, scale=scale, v_dim=v_dim, interpret=interpret)[0]


def _sparse_mla_kernel_fwd(q, kv, indices, scale, v_dim, interpret):
    out, lse = sparse_mla_triton.sparse_mla_fwd(q, kv, indices, scale=scale, v_dim=v_dim, interpret=interpret)
    return out, (q, kv, indices, out, lse)


def _sparse_mla_kernel_bwd(scale, v_dim, interpret, residuals, g):
    q, kv, indices, out, lse = residuals
    dq, dkv = sparse_mla_triton.sparse_mla_bwd(q, kv, indices, out, lse, g, scale=scale, v_dim=v_dim,
                                               interpret=interpret)
    return dq, dkv, None


_sparse_mla_kernel.defvjp(_sparse_mla_kernel_fwd, _sparse_mla_kernel_bwd)
