"""Public DSA entry points: `indexer_topk`, `indexer_topk_decode`, `sparse_mla` and `sparse_mla_decode` (their
names and shapes are a contract).

`impl` picks the implementation:
- "reference": the pure-JAX reference;
- "pallas": the Pallas kernel for this backend: Mosaic on TPU, the Triton lowering elsewhere;
- "triton" / "mosaic": that lowering's kernel, whatever the backend (for tests and benchmarks);
- "auto": Mosaic on TPU, Triton on GPU, the reference elsewhere (the Triton kernel when
  `interpret=True`).
A kernel runs interpreted where it cannot compile: the Triton one on CPU (or with
`interpret=True`), the Mosaic one off TPU (or with `interpret=True`) under
`pltpu.InterpretParams()`, the TPU interpreter that also simulates DMAs and semaphores.
`implementation(impl)` names what runs here.
Kernels: sparse MLA forward and backward (a `jax.custom_vjp`, dkv accumulated over every query
that selected a row); indexer scores, with the top-k of each query chunk on GPU by the Triton kernel
`pallas_kernels/topk_triton.py` (the decode indexer: by `pallas_kernels.topk.select_topk`, radix select in
XLA, no sort; each indexer takes either, `topk_kernel`) and by a stable sort of
(score, index) pairs on TPU, where element gathers are slow (`pallas_kernels/indexer/mosaic.py`); the
decode indexer (`indexer_topk_decode`: few queries, a per-query key limit, one layer read in place from
the stacked cache [L, B, S, D], `pallas_kernels/indexer/{triton,mosaic}_decode.py`; its TPU top-k is
`lax.top_k`, for the same reason). FP8 (e4m3)
indexer inputs: the Triton kernels multiply them natively (fp32 accumulation); the Mosaic ones
widen them to bf16 in VMEM after the DMA (exact: every e4m3 value is a bf16; no fp8 matmul on TPU v4).
Float32 inputs: the kernels' dots take JAX's matmul precision, as XLA's do: at the default, TF32 in the
Triton kernels (as XLA's float32 dots on a GPU) and Mosaic's default contraction precision in the TPU
ones; IEEE float32 in both under `jax.default_matmul_precision("highest")`.
Decode attention (`sparse_mla_decode`: the selected rows of one layer read in place from the
stacked cache [L, B, S, D], `pallas_kernels/sparse_mla/{triton,mosaic}_decode.py`): inference only.
Not behind these entry points yet (untimed, opt-in): the indexer scores as Mosaic GPU kernels for Hopper
(`pallas_kernels/indexer/mosaic_gpu{,_decode}.py`: TMA, wgmma, warp-specialised), through
`indexer_topk_triton(..., mosaic_gpu=True)` and `indexer_topk_decode_triton(..., mosaic_gpu=True)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.indexer import mosaic as indexer_mosaic
from pallas_kernels.indexer import mosaic_decode as indexer_mosaic_decode
from pallas_kernels.indexer import triton as indexer_triton
from pallas_kernels.indexer import triton_decode as indexer_triton_decode
from pallas_kernels.indexer.reference import (
    indexer_topk_decode_reference,
    indexer_topk_reference,
)
from pallas_kernels.sparse_mla import mosaic as sparse_mla_mosaic
from pallas_kernels.sparse_mla import mosaic_decode as sparse_mla_mosaic_decode
from pallas_kernels.sparse_mla import triton as sparse_mla_triton
from pallas_kernels.sparse_mla import triton_decode as sparse_mla_triton_decode
from pallas_kernels.sparse_mla.reference import (
    sparse_mla_decode_reference,
    sparse_mla_reference,
)

_IMPLS = ("auto", "reference", "pallas", "triton", "mosaic")
_SPARSE_MLA_KERNELS = {"triton": sparse_mla_triton, "mosaic": sparse_mla_mosaic}


def _kernel(impl, interpret):
    """(lowering, interpret) of the kernel to run, or (None, False) for the reference."""
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl in ("pallas", "auto"):
        if impl == "auto" and not (interpret or backend in ("gpu", "tpu")):
            return None, False
        impl = "mosaic" if backend == "tpu" else "triton"
    if impl == "reference":
        return None, False
    # Pallas kernels compile only for their accelerator; elsewhere the kernel runs interpreted.
    compiles = backend == ("tpu" if impl == "mosaic" else "gpu")
    return impl, bool(interpret) or not compiles


def implementation(impl: str = "auto") -> str:
    """What `impl` runs on this backend: "reference", "triton" or "mosaic", with " (interpreted)"
    for a kernel that cannot compile here (what a model with `attention_impl=impl` uses)."""
    kernel, interpret = _kernel(impl, False)
    if kernel is None:
        return "reference"
    return kernel + (" (interpreted)" if interpret else "")


def _empty(batch_and_queries, num_keys):
    """No batch row, query or key (or, for attention, no selected slot: K = 0): the result is known (every slot -1,
    or zero attention) and nothing runs; the kernels' grids and the references' chunking assume at least one of
    each."""
    return 0 in (*batch_and_queries, num_keys)


def _check_topk(name, topk):
    if not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{name}: topk: expected a positive int, got {topk!r}")


def indexer_topk(q, k, w, *, topk, k_scale=None, q_offset=0, k_len=None, impl="auto", interpret=False,
                 chunk_size=256, key_block=4096):
    """Top-k keys of the lightning indexer.

    q [B, T, H, D], k [B, S, D], w [B, T, H] (float32; any q scale folded in), optional
    k_scale [B, S] (FP8 keys), k_len a scalar or [B] (keys per sequence; default S) -> int32 [B, T, topk]
    indices of the largest
    I[t, s] = k_scale[s] Σ_h w[t, h] relu(q[t, h]·k[s]) over s <= t + q_offset, s < k_len[b];
    -1 marks slots with no valid key (after the valid ones). Ties: lowest index first. The order
    within a row is not part of the contract: the reference lists indices by decreasing score,
    the kernels by ascending index (the selected set is the same). `impl` and `interpret`: see
    the module docstring; chunk_size and key_block tile the reference.
    """
    kernel, interpret = _kernel(impl, interpret)
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"indexer_topk: expected q [B,T,H,D], k [B,S,D], w [B,T,H]; got {q.shape}, {k.shape}, {w.shape}")
    if q.shape[-1] != k.shape[-1] or q.shape[:3] != w.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"indexer_topk: shapes disagree: q {q.shape}, k {k.shape}, w {w.shape}")
    _check_topk("indexer_topk", topk)
    if k_scale is not None and k_scale.shape != k.shape[:2]:
        raise ValueError(f"indexer_topk: k_scale: expected [B, S] = {k.shape[:2]}, got {k_scale.shape}")
    if k_len is not None:
        if jnp.ndim(k_len) > 1 or jnp.shape(k_len) not in ((), k.shape[:1]):
            raise ValueError(f"indexer_topk: k_len: expected a scalar or [B] = {k.shape[:1]}, got shape "
                             f"{jnp.shape(k_len)} (per-query key limits: indexer_topk_decode)")
        k_len = jnp.broadcast_to(jnp.asarray(k_len, jnp.int32), k.shape[:1])
    if _empty(q.shape[:2], k.shape[1]):
        return jnp.full(q.shape[:2] + (topk,), -1, jnp.int32)
    # Indices carry no gradient; stopping it here keeps autodiff out of the kernel.
    q, k, w = jax.lax.stop_gradient((q, k, w))
    if kernel is not None:
        topk_fn = indexer_mosaic.indexer_topk_mosaic if kernel == "mosaic" else indexer_triton.indexer_topk_triton
        return _without_gradient(functools.partial(topk_fn, topk=topk, q_offset=q_offset, interpret=interpret),
                                 q, k, w, k_scale=k_scale, k_len=k_len)
    return indexer_topk_reference(q, k, w, topk=topk, k_scale=k_scale, q_offset=q_offset, k_len=k_len,
                                  chunk_size=chunk_size, key_block=key_block)


def indexer_topk_decode(q, k_cache, w, layer, k_len, *, topk, k_scale=None, impl="auto", interpret=False):
    """Top-k keys of the lightning indexer in decode, read from one layer of the stacked cache.

    q [B, T, H, D] (T small: 1 in decode, 1 + drafts in speculative verification),
    k_cache [L, B, S, D] (bf16, fp32 or fp8 e4m3), w [B, T, H] (float32), layer: int32 scalar
    (may be traced; must lie in [0, L)), k_len [B, T] int32, k_scale [L, B, S] (FP8 keys) or
    None -> int32 [B, T, topk]: for query t of sequence b the indices of the largest
    I[t, s] = k_scale[layer, b, s] Σ_h w[t, h] relu(q[t, h]·k_cache[layer, b, s]) over s < k_len[b, t]
    (no causal bound: k_len is each query's own limit; values past S are clipped to S). The same
    selection contract as `indexer_topk`: lax.top_k's set (ties: lowest index first), -1 in the
    slots past the valid keys; the reference lists by decreasing score, the kernels by ascending
    index. The kernels read the layer inside the kernel (no [B, S, D] copy of it); the reference
    slices it out. `impl` and `interpret`: see the module docstring.
    """
    kernel, interpret = _kernel(impl, interpret)
    if q.ndim != 4 or k_cache.ndim != 4 or w.ndim != 3:
        raise ValueError(f"indexer_topk_decode: expected q [B,T,H,D], k_cache [L,B,S,D], w [B,T,H]; got {q.shape}, "
                         f"{k_cache.shape}, {w.shape}")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[:3] != w.shape or q.shape[0] != k_cache.shape[1]:
        raise ValueError(f"indexer_topk_decode: shapes disagree: q {q.shape}, k_cache {k_cache.shape}, w {w.shape}")
    _check_topk("indexer_topk_decode", topk)
    if jnp.shape(k_len) != q.shape[:2]:
        raise ValueError(f"indexer_topk_decode: k_len: expected [B, T] = {q.shape[:2]}, got {jnp.shape(k_len)}")
    if k_scale is not None and k_scale.shape != k_cache.shape[:3]:
        raise ValueError(f"indexer_topk_decode: k_scale: expected [L, B, S] = {k_cache.shape[:3]}, got {k_scale.shape}")
    if jnp.ndim(layer) != 0:
        raise ValueError(f"indexer_topk_decode: layer: expected a scalar, got shape {jnp.shape(layer)}")
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < k_cache.shape[0]:
        raise ValueError(f"indexer_topk_decode: layer: expected 0 <= layer < {k_cache.shape[0]}, got {layer}")
    if _empty(q.shape[:2], k_cache.shape[2]):
        return jnp.full(q.shape[:2] + (topk,), -1, jnp.int32)
    layer, k_len = jnp.asarray(layer, jnp.int32), jnp.asarray(k_len, jnp.int32)
    q, k_cache, w = jax.lax.stop_gradient((q, k_cache, w))
    if kernel is not None:
        topk_fn = (indexer_mosaic_decode.indexer_topk_decode_mosaic if kernel == "mosaic"
                   else indexer_triton_decode.indexer_topk_decode_triton)
        return _without_gradient(functools.partial(topk_fn, topk=topk, interpret=interpret),
                                 q, k_cache, w, layer, k_len, k_scale=k_scale)
    return indexer_topk_decode_reference(q, k_cache, w, layer, k_len, topk=topk, k_scale=k_scale)


# A kernel whose output carries no gradient (indices) sits behind a custom_vjp with a zero backward
# because a bare pallas_call is never dead-code eliminated, and Flax's nn.scan then refuses it inside
# the layer scan ("broadcasted variable has a data dependency on the scan body"). fn: a static callable
# (its non-array arguments bound); arrays and None go in args/kwargs.
def _without_gradient(fn, *args, **kwargs):
    return _zero_vjp_call(fn, args, kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _zero_vjp_call(fn, args, kwargs):
    return fn(*args, **kwargs)


def _zero_vjp_call_fwd(fn, args, kwargs):
    return fn(*args, **kwargs), (args, kwargs)


def _zero_vjp_call_bwd(fn, primals, _):
    def zero(x):
        return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else np.zeros(x.shape, jax.dtypes.float0)
    return jax.tree.map(zero, primals)


_zero_vjp_call.defvjp(_zero_vjp_call_fwd, _zero_vjp_call_bwd)


def sparse_mla(q, kv, indices, *, scale, v_dim=512, impl="auto", interpret=False, chunk_size=256,
               unique_indices=False):
    """Attention over the selected latent rows.

    q [B, T, H, Dqk], kv [B, S, Dqk], indices [B, T, K] (-1 = unused; so is any index outside [0, S),
    as in FlashMLA) -> [B, T, H, v_dim], the values being kv[..., :v_dim]; softmax over the selected
    rows only (a row a query selects twice counts twice, in the output and in the gradients).
    Differentiable in q and kv (the kernels' backward kernel; the reference by autodiff). `impl` and
    `interpret`: see the module docstring; chunk_size tiles the reference. unique_indices=True
    promises that no query repeats a row (the indexer's top-k): the Mosaic backward then skips
    sorting each query's indices to merge repeats (`pallas_kernels/sparse_mla/mosaic.py`), and a
    repeated row's dkv is undefined, as with JAX's scatter flag of that name; the other
    implementations are exact either way.
    """
    kernel, interpret = _kernel(impl, interpret)
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"sparse_mla: expected q [B,T,H,D], kv [B,S,D], indices [B,T,K]; got {q.shape}, {kv.shape}, {indices.shape}")
    if q.shape[-1] != kv.shape[-1] or q.shape[:2] != indices.shape[:2] or v_dim > kv.shape[-1]:
        raise ValueError(f"sparse_mla: shapes disagree: q {q.shape}, kv {kv.shape}, indices {indices.shape}, v_dim {v_dim}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"sparse_mla: indices: expected an integer dtype, got {indices.dtype}")
    if _empty(q.shape[:2] + indices.shape[-1:], kv.shape[1]):
        return jnp.zeros(q.shape[:3] + (v_dim,), q.dtype)
    indices = _in_range(indices, kv.shape[1])
    if kernel is not None:
        return _sparse_mla_kernel(q, kv, indices, scale, v_dim, kernel, interpret, bool(unique_indices))
    return sparse_mla_reference(q, kv, indices, scale=scale, v_dim=v_dim, chunk_size=chunk_size)


def _in_range(indices, num_rows):
    """int32 indices with every index outside [0, num_rows) as -1 (unused): the reference would clamp it to a real
    row, the Triton kernels read another sequence's row or past the array, the Mosaic ones DMA out of bounds."""
    indices = indices.astype(jnp.int32)
    return jnp.where((indices >= 0) & (indices < num_rows), indices, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _sparse_mla_kernel(q, kv, indices, scale, v_dim, kernel, interpret, unique_indices):
    return _SPARSE_MLA_KERNELS[kernel].sparse_mla_fwd(q, kv, indices, scale=scale, v_dim=v_dim, interpret=interpret)[0]


def _sparse_mla_kernel_fwd(q, kv, indices, scale, v_dim, kernel, interpret, unique_indices):
    out, lse = _SPARSE_MLA_KERNELS[kernel].sparse_mla_fwd(q, kv, indices, scale=scale, v_dim=v_dim,
                                                          interpret=interpret)
    return out, (q, kv, indices, out, lse)


def _sparse_mla_kernel_bwd(scale, v_dim, kernel, interpret, unique_indices, residuals, g):
    q, kv, indices, out, lse = residuals
    # Only the Mosaic backward merges repeated rows (the Triton one adds each slot atomically).
    merge = {"unique_indices": unique_indices} if kernel == "mosaic" else {}
    dq, dkv = _SPARSE_MLA_KERNELS[kernel].sparse_mla_bwd(q, kv, indices, out, lse, g, scale=scale, v_dim=v_dim,
                                                         interpret=interpret, **merge)
    return dq, dkv, None


_sparse_mla_kernel.defvjp(_sparse_mla_kernel_fwd, _sparse_mla_kernel_bwd)


def sparse_mla_decode(q, kv_cache, layer, indices, *, scale, v_dim=512, impl="auto", interpret=False):
    """Decode attention over the selected rows of one layer of the stacked latent cache.

    q [B, T, H, D] (the absorbed queries; T = 1 in decode, 1 + drafts in speculative verification),
    kv_cache [L, B, S, D] (the model cache's `kv`, bf16 or float32), layer: int32 scalar (may be
    traced; must lie in [0, L)), indices [B, T, K] int32 (rows of kv_cache[layer, b]; -1, or any index
    outside [0, S), = unused) -> [B, T, H, v_dim] in q's dtype: `sparse_mla` of q over kv_cache[layer]
    (softmax over the selected rows only, in float32; a query with no selected row gives zeros). The kernels read the
    rows in place from the cache (no gathered [B, T·K, D] copy, no copy of the layer); the
    reference gathers them. `impl` and `interpret`: see the module docstring.

    Inference only: differentiating the kernel path raises a ValueError (a bare pallas_call fails
    under jax.grad with an empty AssertionError / NotImplementedError); the reference is
    differentiable. The Mosaic kernel needs an even S for a bf16 cache (rows are DMA'd in pairs).
    """
    kernel, interpret = _kernel(impl, interpret)
    if q.ndim != 4 or kv_cache.ndim != 4 or indices.ndim != 3:
        raise ValueError(f"sparse_mla_decode: expected q [B,T,H,D], kv_cache [L,B,S,D], indices [B,T,K]; got {q.shape}, "
                         f"{kv_cache.shape}, {indices.shape}")
    if q.shape[-1] != kv_cache.shape[-1] or q.shape[:2] != indices.shape[:2] or q.shape[0] != kv_cache.shape[1]:
        raise ValueError(f"sparse_mla_decode: shapes disagree: q {q.shape}, kv_cache {kv_cache.shape}, "
                         f"indices {indices.shape}")
    if not 0 < v_dim <= q.shape[-1]:
        raise ValueError(f"sparse_mla_decode: v_dim: expected 0 < v_dim <= D = {q.shape[-1]}, got {v_dim}")
    if kv_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"sparse_mla_decode: kv_cache dtype: expected bfloat16 or float32, got {kv_cache.dtype}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"sparse_mla_decode: indices: expected an integer dtype, got {indices.dtype}")
    if jnp.ndim(layer) != 0:
        raise ValueError(f"sparse_mla_decode: layer: expected a scalar, got shape {jnp.shape(layer)}")
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < kv_cache.shape[0]:
        raise ValueError(f"sparse_mla_decode: layer: expected 0 <= layer < {kv_cache.shape[0]}, got {layer}")
    if _empty(q.shape[:2] + indices.shape[-1:], kv_cache.shape[2]):
        return jnp.zeros(q.shape[:3] + (v_dim,), q.dtype)
    layer, indices = jnp.asarray(layer, jnp.int32), _in_range(indices, kv_cache.shape[2])
    if kernel is not None:
        decode_fn = (sparse_mla_mosaic_decode.sparse_mla_decode_mosaic if kernel == "mosaic"
                     else sparse_mla_triton_decode.sparse_mla_decode_triton)
        return _inference_only(functools.partial(decode_fn, scale=scale, v_dim=v_dim, interpret=interpret),
                               (q, kv_cache, layer, indices))
    return sparse_mla_decode_reference(q, kv_cache, layer, indices, scale=scale, v_dim=v_dim)


# The decode kernels have no backward: this custom_vjp turns jax.grad through them into a clear error.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inference_only(fn, args):
    return fn(*args)


def _inference_only_fwd(fn, args):
    return fn(*args), None


def _inference_only_bwd(fn, residuals, g):
    raise ValueError("sparse_mla_decode: the decode kernels are inference only (no gradient); differentiate "
                     "impl='reference', or ops.sparse_mla on gathered rows")


_inference_only.defvjp(_inference_only_fwd, _inference_only_bwd)
