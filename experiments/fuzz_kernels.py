"""Random cases of the DSA kernels against their pure-JAX references: odd sizes, random tiles and masks.

    python -m experiments.fuzz_kernels [--fuzz_kernels=indexer,indexer_decode,sparse_mla,sparse_mla_decode]
        [--fuzz_impls=triton,mosaic] [--fuzz_cases=20] [--fuzz_seed=0] [--fuzz_out=fuzz_kernels.json]

(The flags carry a prefix because tests import this module beside other binaries, and absl refuses a
flag name defined twice.)

Each case draws sizes that are multiples of no block (T, S, K, heads, head dims), masks (causal
offsets, negative ones included, per-sequence and per-query key limits, S < topk, unused and
repeated selected rows), dtypes (float32, bfloat16; fp8 e4m3 with per-key scales for the indexers)
and the kernel's tiles (chunks, causal runs, key blocks, key loop or, for bf16/fp8 indexer cases now and then,
the Mosaic GPU scores kernels (not interpreted under JAX 0.10), top-k kernel or selection, head
and row blocks, value split, split dkv, launch order, decode splits and key loops), runs the kernel (compiled on
its accelerator, interpreted elsewhere; a Triton kernel off GPU is also lowered for CUDA, which the
interpreter never does: `triton_lowering.export_for_cuda`) and its reference, and checks
- indexers: -1s only after the selected keys, no key twice, none past the query's limit, and the
  reference's set of keys, where a key in one set only must tie in score (1e-4) with one in the other;
- attention: the output, and for the prefill kernels dq and dkv against the reference's VJP, within
  1e-4 (float32) or 3e-2 (bfloat16) of the largest reference value (5e-2 for bf16 gradients).
Every case runs under `jax.default_matmul_precision("highest")`: on a GPU a float32 dot at the default
precision is TF32 (10-bit mantissa), in the kernels (Pallas' Triton lowering) as in XLA's reference,
and 1e-4 holds only for IEEE float32 on both sides.
One line per case, a table per kernel and impl, JSON with each case's parameters (drawn before the
kernel runs, so a failing case has them too; the seed and the case number redraw it) and its error.
Exit status 1 if any case failed. What it found (a row a query selects twice lost a gradient: the
Mosaic backward, the Triton one interpreted; an fp8 decode cache of no whole key blocks did not
lower for CUDA; float32 cases failed 1e-4 on the H200 under TF32) is in the tests now.
"""

import collections
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import ops
from pallas_kernels.indexer import mosaic_gpu
from pallas_kernels.indexer.mosaic import SELECTIONS, indexer_topk_mosaic
from pallas_kernels.indexer.mosaic_decode import indexer_topk_decode_mosaic
from pallas_kernels.indexer.reference import (
    indexer_scores,
    indexer_topk_decode_reference,
    indexer_topk_reference,
)
from pallas_kernels.indexer.triton import indexer_topk_triton
from pallas_kernels.indexer.triton_decode import indexer_topk_decode_triton
from pallas_kernels.sparse_mla import mosaic as mla_mosaic
from pallas_kernels.sparse_mla import triton as mla_triton
from pallas_kernels.sparse_mla.mosaic_decode import sparse_mla_decode_mosaic
from pallas_kernels.sparse_mla.reference import (
    sparse_mla_decode_reference,
    sparse_mla_reference,
)
from pallas_kernels.sparse_mla.triton_decode import sparse_mla_decode_triton
from pallas_kernels.triton_lowering import export_for_cuda

KERNELS = ("indexer", "indexer_decode", "sparse_mla", "sparse_mla_decode")
IMPLS = ("triton", "mosaic")
_KERNELS = flags.DEFINE_list("fuzz_kernels", list(KERNELS), f"kernels to check: {KERNELS}")
_IMPLS = flags.DEFINE_list("fuzz_impls", list(IMPLS), f"lowerings to check: {IMPLS}")
_CASES = flags.DEFINE_integer("fuzz_cases", 20, "random cases per kernel and lowering")
_SEED = flags.DEFINE_integer("fuzz_seed", 0, "seed of the first case; case i of a kernel and lowering uses (seed, i)")
_OUT = flags.DEFINE_string("fuzz_out", "fuzz_kernels.json", "JSON output path")

SCORE_TIE = 1e-4


def _pick(rng, *options):
    return options[int(rng.integers(len(options)))]


def _sizes(rng, *ends):
    """One int in [1, end) per end."""
    return tuple(int(rng.integers(1, end)) for end in ends)


def _interpret(impl):
    """Compiled on the lowering's accelerator, interpreted elsewhere (`ops.implementation`'s answer)."""
    return ops.implementation(impl).endswith("(interpreted)")


def _run_kernel(impl, kernel, *args, **kwargs):
    """kernel(*args, **kwargs), compiled on its accelerator, else interpreted; a Triton kernel then also lowered for
    CUDA first, so that a primitive its lowering lacks fails here too."""
    interpret = _interpret(impl)
    if impl == "triton" and interpret:
        export_for_cuda(lambda *a: kernel(*a, **kwargs), args)
    return kernel(*args, **kwargs, interpret=interpret)


def _indexer_inputs(rng, shape_q, shape_k, fp8):
    """(q, k, w, k_scale): standard normal q, k in a random dtype (fp8 e4m3 when fp8), w [.., H] and k_scale
    (always for fp8, else now and then) float32."""
    dtype = jnp.float8_e4m3fn if fp8 else _pick(rng, jnp.float32, jnp.bfloat16)
    q, k = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_k))
    w = jnp.asarray(rng.normal(size=shape_q[:-1]), jnp.float32)
    k_scale = jnp.asarray(rng.uniform(0.5, 1.5, size=shape_k[:-1]), jnp.float32) if fp8 or rng.random() < 0.3 else None
    return q, k, w, k_scale


def assert_same_keys(got, want, scores, limits):
    """Raises AssertionError unless got [B, T, K] selects want's keys (up to score ties) under the limits [B, T]."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} vs the reference's {want.shape}"
    for b, t in np.ndindex(*got.shape[:2]):
        row, n = got[b, t], int((got[b, t] >= 0).sum())
        assert (row[:n] >= 0).all() and (row[n:] == -1).all(), f"[{b}, {t}]: -1 before a selected key: {row}"
        assert len(set(row[:n].tolist())) == n, f"[{b}, {t}]: a key twice: {row}"
        assert (row[:n] < limits[b, t]).all(), f"[{b}, {t}]: a key past the limit {limits[b, t]}: {row}"
        mine, theirs = set(row[:n].tolist()), set(want[b, t][want[b, t] >= 0].tolist())
        assert len(mine) == len(theirs), f"[{b}, {t}]: {len(mine)} keys, the reference {len(theirs)}"
        only_mine, only_theirs = sorted(scores[b, t][list(mine - theirs)]), sorted(scores[b, t][list(theirs - mine)])
        assert np.allclose(only_mine, only_theirs, rtol=SCORE_TIE, atol=SCORE_TIE), (
            f"[{b}, {t}]: keys {sorted(mine - theirs)} instead of {sorted(theirs - mine)} (scores {only_mine} vs "
            f"{only_theirs})")


def _close(got, want, tol, name):
    want = np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * scale, err_msg=name)


def indexer_case(rng, impl, params):
    b, t, s = _sizes(rng, 3, 70, 300)
    h, d, topk = _pick(rng, 1, 4, 5), _pick(rng, 16, 32), _pick(rng, 1, 7, 16, 33, 80)
    q_offset = _pick(rng, 0, 0, 5, s, -3)
    k_len = jnp.asarray(rng.integers(0, s + 3, size=b), jnp.int32) if rng.random() < 0.5 else None
    q, k, w, k_scale = _indexer_inputs(rng, (b, t, h, d), (b, s, d), fp8=rng.random() < 0.3)
    if impl == "triton":
        tiles = {"chunk_size": _pick(rng, 8, 16, 32), "segments": _pick(rng, 1, 3, 8),
                 "topk_kernel": _pick(rng, False, True), "block_t": _pick(rng, 2, 4), "block_s": _pick(rng, 16, 32),
                 "key_loop": _pick(rng, False, True)}
        # bf16/fp8 scores now and then by the Mosaic GPU kernel (drawn alike everywhere; not run where JAX 0.10's
        # interpreter would have to: it lacks the kernel's transposed wgmma operand).
        mosaic = q.dtype != jnp.float32 and rng.random() < 0.4
        mosaic_tiles = {"mosaic_gpu": True, "block_t": _pick(rng, 1, 2), "block_s": _pick(rng, 64, 128),
                        "num_stages": _pick(rng, 1, 2, 3)}
        mosaic_tiles["pingpong"] = mosaic_tiles["num_stages"] > 1 and _pick(rng, True, True, False)
        if mosaic and not (mosaic_gpu.JAX_010 and _interpret(impl)):
            tiles = {k: v for k, v in tiles.items() if k != "key_loop"} | mosaic_tiles
        kernel = indexer_topk_triton
    else:
        tiles = {"chunk_size": _pick(rng, 8, 16), "key_block": _pick(rng, 128, 256),
                 "selection": _pick(rng, *SELECTIONS)}
        kernel = indexer_topk_mosaic
    params.update(b=b, t=t, s=s, h=h, d=d, topk=topk, q_offset=q_offset, k_len=k_len is not None, dtype=q.dtype.name,
                  **tiles)
    inputs = {"topk": topk, "k_scale": k_scale, "q_offset": q_offset, "k_len": k_len}
    got = _run_kernel(impl, kernel, q, k, w, **inputs, **tiles)
    want = indexer_topk_reference(q, k, w, **inputs)
    limits = np.minimum(np.arange(t)[None, :] + q_offset + 1, np.full((b, 1), s) if k_len is None
                        else np.minimum(np.asarray(k_len), s)[:, None])
    assert_same_keys(got, want, np.asarray(indexer_scores(q, k, w, k_scale)), limits)


def indexer_decode_case(rng, impl, params):
    layers, b, t, s = _sizes(rng, 4, 4, 4, 300)
    h, d, topk = _pick(rng, 1, 3, 4, 8), _pick(rng, 16, 32, 128), _pick(rng, 1, 7, 16, 33, 80)
    # A third of the Triton cases score with the Mosaic GPU kernel (drawn alike everywhere; not run under JAX 0.10's
    # interpreter), on a cache it reads in place: bf16/fp8 keys of 128 elements, S a multiple of 8.
    mosaic = impl == "triton" and rng.random() < 0.3
    if mosaic:
        s, d = max(8, s - s % 8), 128
    layer = int(rng.integers(layers))
    k_len = jnp.asarray(rng.integers(0, s + 3, size=(b, t)), jnp.int32)
    q, k_cache, w, k_scale = _indexer_inputs(rng, (b, t, h, d), (layers, b, s, d), fp8=rng.random() < 0.3)
    if mosaic and q.dtype == jnp.float32:
        q, k_cache = q.astype(jnp.bfloat16), k_cache.astype(jnp.bfloat16)
    if impl == "triton":
        tiles = {"block_s": _pick(rng, 16, 64, 128), "topk_kernel": _pick(rng, False, True),
                 "blocks": _pick(rng, 1, 2, 5), "num_stages": _pick(rng, 1, 3)}
        if mosaic and not (mosaic_gpu.JAX_010 and _interpret(impl)):
            tiles |= {"mosaic_gpu": True, "block_s": _pick(rng, 64, 128)}
        kernel = indexer_topk_decode_triton
    else:
        tiles = {"selection": _pick(rng, *SELECTIONS)}
        kernel = indexer_topk_decode_mosaic
    params.update(layers=layers, b=b, t=t, s=s, h=h, d=d, topk=topk, layer=layer, dtype=q.dtype.name, **tiles)
    got = _run_kernel(impl, kernel, q, k_cache, w, layer, k_len, topk=topk, k_scale=k_scale, **tiles)
    want = indexer_topk_decode_reference(q, k_cache, w, layer, k_len, topk=topk, k_scale=k_scale)
    scores = indexer_scores(q, k_cache[layer], w, None if k_scale is None else k_scale[layer])
    assert_same_keys(got, want, np.asarray(scores), np.minimum(np.asarray(k_len), s))


def _attention_inputs(rng, shape_q, shape_kv, indices_shape, s, unique=False, trailing=False):
    """(q, kv, indices): normal q, kv in a random float dtype; indices in [0, s) with ~20 % -1, rows repeating
    within a query unless unique (then each query's rows are distinct, -1 past the s rows there are); trailing:
    each query's slots past a random count (0 to K) are -1 too, as the indexer's are past its keys (the kernels
    walk no block past a query's last used slot)."""
    dtype = _pick(rng, jnp.float32, jnp.bfloat16)
    q, kv = (jnp.asarray(rng.normal(size=shape), dtype) for shape in (shape_q, shape_kv))
    if unique:
        k = indices_shape[-1]
        idx = np.stack([np.pad(rng.permutation(s)[:k], (0, max(0, k - s)), constant_values=-1)
                        for _ in range(math.prod(indices_shape[:-1]))]).reshape(indices_shape)
    else:
        idx = rng.integers(0, s, size=indices_shape)
    unused = rng.random(size=idx.shape) < 0.2
    if trailing:
        unused |= np.arange(idx.shape[-1]) >= rng.integers(0, idx.shape[-1] + 1, size=idx.shape[:-1] + (1,))
    return q, kv, jnp.asarray(np.where(unused, -1, idx), jnp.int32)


def _tolerances(dtype):
    """(output, gradient) tolerances relative to the largest reference value."""
    return (1e-4, 1e-4) if dtype == jnp.float32 else (3e-2, 5e-2)


def sparse_mla_case(rng, impl, params):
    b, t, s = _sizes(rng, 3, 6, 300)
    h, v, r = _pick(rng, 1, 3, 16, 33), _pick(rng, 16, 32, 40, 64), _pick(rng, 8, 16, 24)
    k = _pick(rng, 1, 20, 64, 129, 300)
    # Now and then distinct rows per query, which the Mosaic backward may then take as they are (the model's form).
    unique, trailing = rng.random() < 0.3, rng.random() < 0.3
    q, kv, idx = _attention_inputs(rng, (b, t, h, v + r), (b, s, v + r), (b, t, k), s, unique=unique,
                                   trailing=trailing)
    scale = 0.15
    if impl == "triton":
        tiles = {"block_h": _pick(rng, 16, 32), "block_k": _pick(rng, 16, 32), "head_major": _pick(rng, False, True)}
        fwd_tiles = tiles | {"v_split": _pick(rng, 1, 2) if v > 16 else 1, "walk_all": _pick(rng, False, True)}
        bwd_tiles = tiles | {"split_dkv": _pick(rng, False, True)}
        kernels = mla_triton
    else:
        fwd_tiles = {"block_k": _pick(rng, 128, 256)}
        bwd_tiles = fwd_tiles | {"unique_indices": unique}
        kernels = mla_mosaic
    params.update(b=b, t=t, s=s, h=h, v=v, r=r, k=k, trailing=trailing, dtype=q.dtype.name, forward=fwd_tiles,
                  backward=bwd_tiles)
    out, lse = _run_kernel(impl, kernels.sparse_mla_fwd, q, kv, idx, scale=scale, v_dim=v, **fwd_tiles)
    d_out = jnp.asarray(rng.normal(size=out.shape), q.dtype)
    dq, dkv = _run_kernel(impl, kernels.sparse_mla_bwd, q, kv, idx, out, lse, d_out, scale=scale, v_dim=v, **bwd_tiles)
    f32 = lambda x: x.astype(jnp.float32)
    want, vjp = jax.vjp(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=scale, v_dim=v), f32(q), f32(kv))
    tol, grad_tol = _tolerances(q.dtype)
    _close(out, want, tol, "out")
    for name, got, ref in zip(("dq", "dkv"), (dq, dkv), vjp(f32(d_out))):
        _close(got, ref, grad_tol, name)


def sparse_mla_decode_case(rng, impl, params):
    layers, b, t, s = _sizes(rng, 3, 4, 4, 200)
    h, v, r, k = _pick(rng, 1, 5, 16, 64), _pick(rng, 16, 32, 64), _pick(rng, 8, 16), _pick(rng, 1, 23, 64, 200)
    if impl == "mosaic":
        s += s % 2  # a bf16 cache is DMA'd in row pairs: the Mosaic kernel takes an even S (checked in its tests)
    trailing = rng.random() < 0.3
    q, kv_cache, idx = _attention_inputs(rng, (b, t, h, v + r), (layers, b, s, v + r), (b, t, k), s,
                                         trailing=trailing)
    layer = int(rng.integers(layers))
    if impl == "triton":
        tiles = {"block_h": _pick(rng, 16, 64), "block_k": _pick(rng, 16, 32), "num_splits": _pick(rng, 1, 2, 3),
                 "walk_all": _pick(rng, False, True)}
        kernel = sparse_mla_decode_triton
    else:
        tiles = {"block_k": 128}
        kernel = sparse_mla_decode_mosaic
    params.update(layers=layers, b=b, t=t, s=s, h=h, v=v, r=r, k=k, trailing=trailing, layer=layer,
                  dtype=q.dtype.name, **tiles)
    got = _run_kernel(impl, kernel, q, kv_cache, layer, idx, scale=0.15, v_dim=v, **tiles)
    want = sparse_mla_decode_reference(q.astype(jnp.float32), kv_cache.astype(jnp.float32), layer, idx, scale=0.15,
                                       v_dim=v)
    _close(got, want, _tolerances(q.dtype)[0], "out")


CASES = {"indexer": indexer_case, "indexer_decode": indexer_decode_case, "sparse_mla": sparse_mla_case,
         "sparse_mla_decode": sparse_mla_decode_case}


def run(kernels, impls, cases, seed):
    """[{kernel, impl, case, status ("ok", "FAIL": a mismatch, "error": an exception), params, error, seconds}]."""
    results = []
    for kernel in kernels:
        for impl in impls:
            for case in range(cases):
                rng = np.random.default_rng([seed, KERNELS.index(kernel), IMPLS.index(impl), case])
                start, params = time.perf_counter(), {}
                try:
                    with jax.default_matmul_precision("highest"):
                        CASES[kernel](rng, impl, params)
                    status, error = "ok", ""
                except AssertionError as e:
                    status, error = "FAIL", str(e)
                except Exception as e:  # noqa: BLE001 (a kernel that raises is a result too)
                    status, error = "error", f"{type(e).__name__}: {e}"
                results.append({"kernel": kernel, "impl": impl, "case": case, "status": status, "params": params,
                                    "error": error[:2000], "seconds": round(time.perf_counter() - start, 2)})
                print(f"{kernel:18s} {impl:7s} case {case:3d} {status:5s} {params}"
                      + (f"\n    {error[:300]}" if error else ""), flush=True)
    return results


def main(argv):
    del argv
    # Mosaic GPU's interpreter runs each simulated warpgroup as an XLA:CPU computation whose barrier waits block in
    # host callbacks; with one CPU device on a 2-core machine they can starve the callback threads (a hang). Several
    # host devices avoid it (tests/conftest.py runs 8). Set before JAX starts its backends (it has not, here).
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    for name, values, known in (("fuzz_kernels", _KERNELS.value, KERNELS), ("fuzz_impls", _IMPLS.value, IMPLS)):
        if not set(values) <= set(known):
            raise app.UsageError(f"--{name}: expected some of {known}, got {values}")
    results = run(_KERNELS.value, _IMPLS.value, _CASES.value, _SEED.value)
    print(f"\n{'kernel':18s} {'impl':7s} {'mode':12s} {'cases':>5s} {'ok':>4s} {'FAIL':>4s} {'error':>5s} "
          f"{'seconds':>8s}")
    for kernel in _KERNELS.value:
        for impl in _IMPLS.value:
            rows = [r for r in results if r["kernel"] == kernel and r["impl"] == impl]
            count = collections.Counter(r["status"] for r in rows)
            mode = "interpreted" if _interpret(impl) else "compiled"
            print(f"{kernel:18s} {impl:7s} {mode:12s} {len(rows):5d} {count['ok']:4d} {count['FAIL']:4d} "
                  f"{count['error']:5d} {sum(r['seconds'] for r in rows):8.1f}")
    with open(_OUT.value, "w") as f:
        json.dump({"backend": jax.default_backend(), "seed": _SEED.value, "results": results}, f, indent=1)
    return int(any(r["status"] != "ok" for r in results))


if __name__ == "__main__":
    app.run(main)
