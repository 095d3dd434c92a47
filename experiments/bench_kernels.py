"""Microbenchmarks of the DSA kernels against their baselines, measured in the same run.

    python -m experiments.bench_kernels [--seq_lens=4096,16384,65536] [--topk=2048] [--out=bench_kernels.json]
        [--parts=decode,decode_mla,sparse_mla,indexer,backward]

sparse_mla forward (V3.2 shapes: H=128 heads, Dqk=576, Dv=512, k=2048, one KV row per token):
  - the Pallas kernel (Triton lowering), each --configs tile config (block_h:block_k:num_warps:num_stages) at --sweep_len, then the
    best one at every length; per sweep config also the "gathered" GB/s: the bytes its programs load (each head
    block's program gathers every selected row itself, H/block_h times the unique rows GB/s counts) per second;
    the 32-head tile's measured 226 TFLOP/s was ~3.7 TB/s of it (60 FLOP/B), a 64-head tile loads half per FLOP;
  - the XLA reference (`pallas_kernels/sparse_mla/reference.py`) up to --max_reference_len;
  - dense causal attention in MHA mode (what V3.1 prefill ran): `jax.nn.dot_product_attention`
    (cuDNN on GPU), q/k 192-d, v 128-d padded to 192 (cuDNN wants equal dims; FLOPs count 128).
indexer_topk (V3.2: 64 heads x 128, bf16 q/k, fp32 head weights): the scores kernel with a
chunked top-k (the top-k kernel `select_topk_triton`, the default), each --index_configs tile at
--sweep_len, then at every length the best config of each kernel: the Triton grid kernel, the Triton
key-loop kernel (a config ending in ":loop": `key_loop=True`, one program per query tile looping over
the key blocks) and the Mosaic GPU kernel (":mgpu", `pallas_kernels/indexer/mosaic_gpu.py`: TMA,
wgmma, a producer and two consumer warpgroups); rows labelled "grid" / "key-loop" / "mosaic-gpu",
and the sweep prints each against the fastest; each --index_fp8_configs tile
in fp8 e4m3 q and k at --sweep_len and the best of them at every length, and,
as the baseline of the causal runs (`segments`: each run of query chunks scored against only the
keys its last query sees), the overall best with segments=1 (every chunk against all T keys) and
the best with select_topk (XLA) for the top-k kernel, against the XLA reference up to
--max_reference_len; FLOPs = 2·(causal pairs)·H_I·D_I (the QK matmul only, as DeepGEMM counts),
and a row "indexer + sparse_mla" summing both kernels, printed against cuDNN dense (the issue's
3x target; from the same run, or from --prefill_from's JSON of a --parts=sparse_mla run).
The split, per query chunk (the last chunk of --index_chunk queries, which sees all T keys):
the scores kernel alone, then top-k alone on its [chunk, T] fp32 scores, `select_topk` (radix
select in XLA, what the kernel path runs by default) against `lax.top_k` (sort-based on GPU)
and the top-k kernel at each --topk_configs tile (block:num_warps; checked equal to select_topk,
order included); GB/s counts one read of the scores. The whole indexer runs T/chunk such chunks
(earlier ones score fewer key blocks, but top-k always reads all T columns). Also printed: whether select_topk took its
sampled path (else its exact fallback over the full rows) and that both select the same set.
sparse_mla backward (dq, dkv with atomic adds), each --bwd_configs tile config at --bwd_len (one
kernel, dkv added per head block, or ":split": dq and dkv in two kernels, dkv summed over all heads
before its one atomic add per row block),
against `jax.vjp` of the XLA reference; backward FLOPs = 2·T·k·H·(3·Dqk + 2·Dv).
Counting follows FlashMLA: sparse FLOPs = 2·T·k·H·(Dqk + Dv) (unused slots included), bytes =
valid rows · Dqk · 2 + T·H·(Dqk + Dv)·2; dense causal FLOPs = T²·H·(192 + 128). Roofline
fractions use --peak_tflops and --peak_gbs (H200 measured here: ~790 TFLOP/s bf16, ~4.3 TB/s).
Decode indexer (`ops.indexer_topk_decode`'s Triton kernel + select_topk; B=64 sequences, S=128K
valid keys, T=1 query, 64 heads x 128, bf16 then fp8 keys with scales, on the last layer of an
L=2 stacked cache): each --decode_configs tile (block_s:num_warps:blocks:num_stages, blocks = key
blocks per program, in a loop; ":mgpu": the Mosaic GPU kernel, `pallas_kernels/indexer/mosaic_gpu_decode.py`,
blocks per CTA streamed by TMA through num_stages slots) in bf16, each checked against the reference,
the best Triton and the best Mosaic GPU tiles in fp8, the fastest one's scores kernel alone, the
best with the top-k kernel (checked equal), and in the same run the old path on the sliced layer
(the XLA reference; the prefill kernel once per query). GB/s counts the layer's key (+ scale) bytes,
read once: the target is >= 70 % of --peak_gbs (perf_targets.md); see `_decode`.
Decode sparse MLA attention (--parts=decode_mla: `ops.sparse_mla_decode`'s Triton
kernel reading the selected rows from the stacked latent cache [L, B, S, 576], bf16; B=64, S=128K,
T=1, H=128, k=2048 unique rows per query, the last layer of L=2): each --decode_mla_configs tile
(block_h:block_k:num_warps:num_splits), checked against the XLA reference on the device, against
the old path (an XLA gather of the rows into [B, T·k, 576], then the prefill Triton kernel
`sparse_mla_fwd`) and the XLA reference (`sparse_mla_decode_reference`). GB/s and the
"hbm_roofline" fraction count the bytes that must be read: B·T·k·576·2 (rows) + q + out; see
`_decode_attention`.
Before timing, each kernel config is checked against the reference on the device (max abs error; index
set agreement for the indexers).
Times are medians of --repeats runs after a warm-up; on shared machines prefer ratios.
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_kernels import topk as topk_lib
from pallas_kernels.indexer.mosaic_gpu import indexer_scores_mosaic_gpu
from pallas_kernels.indexer.mosaic_gpu_decode import indexer_scores_decode_mosaic_gpu
from pallas_kernels.indexer.reference import (
    indexer_topk_decode_reference,
    indexer_topk_reference,
)
from pallas_kernels.indexer.triton import indexer_scores_triton, indexer_topk_triton
from pallas_kernels.indexer.triton_decode import (
    indexer_scores_decode_triton,
    indexer_topk_decode_triton,
)
from pallas_kernels.sparse_mla.reference import (
    gather_decode_rows,
    sparse_mla_decode_reference,
    sparse_mla_reference,
)
from pallas_kernels.sparse_mla.triton import sparse_mla_bwd, sparse_mla_fwd
from pallas_kernels.sparse_mla.triton_decode import sparse_mla_decode_triton
from pallas_kernels.topk_triton import select_topk_triton

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "16384", "65536"], "query (= key) lengths T")
_TOPK = flags.DEFINE_integer("topk", 2048, "selected rows per query")
_HEADS = flags.DEFINE_integer("heads", 128, "attention heads")
_V_DIM = flags.DEFINE_integer("v_dim", 512, "latent / value dim")
_ROPE_DIM = flags.DEFINE_integer("rope_dim", 64, "RoPE dim (Dqk = v_dim + rope_dim)")
# The four fastest of a 15-config sweep on an H200 (16:32 .. 64:128 tiles, 4/8 warps, 1-3 stages). On 2026-11-29
# (jax 0.11.2, T=16K) 32:64:4:2 233 TFLOP/s, 64:64:8:3 221; the tiles triton_static shows on wgmma without spills
# were slower: 64:16:8:2 107, 64:16:8:3 104, value split 64:32:8:2:v2 87, 64:16:8:3:v2 54.
# ":all" walks every index block (a static trip count), the form timed before 2026-11-30: against the default,
# which stops at each query's last used slot (the first 2048 queries hold fewer rows).
_CONFIGS = flags.DEFINE_list("configs", ["32:64:4:2", "32:64:4:2:all", "64:64:8:3", "32:64:4:3", "64:64:8:2"],
                             "block_h:block_k:num_warps:num_stages[:vN][:all] (:vN = v_split=N: N programs per "
                             "head block, each accumulating 1/N of the value columns; :all = walk_all: every "
                             "index block, not only those up to the last used slot), ...")
_SWEEP_LEN = flags.DEFINE_integer("sweep_len", 16384, "length at which tile configs are compared")
_CHECK_LEN = flags.DEFINE_integer("check_len", 1024, "length at which the prefill kernels are checked against the "
                                  "reference on the device")
_MAX_REF = flags.DEFINE_integer("max_reference_len", 16384, "longest T for the XLA reference")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs (median reported)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 790.0, "bf16 matmul peak for the roofline fraction")
_PEAK_GBS = flags.DEFINE_float("peak_gbs", 4300.0, "HBM bandwidth for the roofline fraction")
_OUT = flags.DEFINE_string("out", "bench_kernels.json", "JSON output path")
_PREFILL_FROM = flags.DEFINE_string("prefill_from", "", "JSON of an earlier --parts=sparse_mla run on this machine: "
                                    "its forward and dense timings make the indexer part's DSA-vs-dense rows when "
                                    "sparse_mla is not among --parts (gpu_check.sh runs the two apart)")
# 32:64 and 16:64 tiles exceed the H200's 227 KiB of shared memory in the backward kernel. On an H200 (2026-11-29,
# T=16K) 32:32:8:2 took 285 ms, 32:32:8:2:split 324, 32:32:4:2 337, 16:16:4:2:split 373, 16:32:4:2 408,
# 16:32:8:2 451, 32:16:8:2:split 549.
_BWD_CONFIGS = flags.DEFINE_list("bwd_configs", ["32:32:8:2", "32:32:8:2:split", "32:32:4:2"],
                                  "backward tiles block_h:block_k:num_warps:num_stages[:split] (:split = dq and dkv "
                                  "in two kernels, dkv summed over all heads before its atomic add), ...")
_BWD_LEN = flags.DEFINE_integer("bwd_len", 16384, "length at which the backward kernel is timed")
_MAX_REF_BWD = flags.DEFINE_integer("max_reference_bwd_len", 4096,
                                    "longest T for the reference VJP (it holds T·k gathered rows: 118 GiB at 16K)")
_INDEX_HEADS = flags.DEFINE_integer("index_heads", 64, "indexer heads")
_INDEX_DIM = flags.DEFINE_integer("index_dim", 128, "indexer head dim")
# On an H200 (2026-11-29, T=16K) key-loop 2:128:8:2 took 10.8 ms, 2:64:8:2 11.8, 4:128:8:1 12.6, 4:64:8:2 14.0; the
# grid kernel 4:128:8:2 14.2 (kept as the baseline), 2:64:4:2 14.3, 4:64:8:2 14.3, 8:64:8:2 15.4. triton_static:
# none of these spills (4-warp and block_t=4 key-loop tiles at block_s=128 do).
# The Mosaic GPU kernel (":mgpu"; untimed): 2:128 and 4:64 hold 128 accumulator registers per consumer thread.
_INDEX_CONFIGS = flags.DEFINE_list("index_configs", ["2:128:8:2:loop", "2:128:8:3:loop", "2:64:8:2:loop",
                                                    "2:64:8:3:loop", "4:128:8:2", "2:128:12:3:mgpu",
                                                    "4:64:12:3:mgpu", "2:64:12:4:mgpu"],
                                   "indexer tiles block_t:block_s:num_warps:num_stages[:loop|:mgpu] (:loop = the "
                                   "Triton key-loop kernel, :mgpu = the Mosaic GPU kernel, num_warps 12), ...")
# FP8 tiles hold half the bytes: triton_static compiles these without spills (4:128 and 2:256 spill in bf16). Untimed.
_INDEX_FP8_CONFIGS = flags.DEFINE_list("index_fp8_configs", ["2:128:8:2:loop", "4:128:8:2:loop", "2:256:8:2:loop",
                                                            "4:256:8:2:loop", "2:128:12:4:mgpu", "4:64:12:4:mgpu"],
                                       "indexer tiles for fp8 q and k, swept apart (same format as --index_configs)")
# experiments/triton_static: no spills; 128 registers at 8 warps (2 programs per SM), 168 at 4 warps (3 per SM).
_TOPK_CONFIGS = flags.DEFINE_list("topk_configs", ["4096:8", "2048:4"],
                                  "top-k kernel (select_topk_triton) tiles block:num_warps, ...")
_INDEX_VARIANTS = flags.DEFINE_bool("index_variants", True, "indexer: also time, at every length, the forms the "
                                    "defaults replaced (one causal run, select_topk) and the per-chunk split "
                                    "(gpu_check.sh's quick 'kernels' part turns this off)")
_INDEX_CHUNK = flags.DEFINE_integer("index_chunk", 512, "queries per indexer chunk (indexer_topk_triton's default)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "run the kernel in Pallas interpret mode (CPU smoke runs)")
_PART_NAMES = ("decode", "decode_mla", "sparse_mla", "indexer", "backward")
_PARTS = flags.DEFINE_list("parts", list(_PART_NAMES), f"which benchmarks to run, in this order: {_PART_NAMES}")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 64, "decode: sequences B")
_DECODE_LEN = flags.DEFINE_integer("decode_len", 131072, "decode: cached keys per sequence S (all valid)")
_DECODE_QUERIES = flags.DEFINE_integer("decode_queries", 1, "decode: queries per sequence T (1 + speculative drafts)")
_DECODE_LAYERS = flags.DEFINE_integer("decode_layers", 2, "decode: layers L of the stacked cache (the last is read)")
# On an H200 (2026-11-29, one block per program) 128:4 took 1.68 ms, 256:4 1.77, 256:8 1.80, 64:4 1.88: 30 % of HBM
# bandwidth. The key loop (blocks > 1, pipelined over num_stages) is untimed.
# ":mgpu": the Mosaic GPU kernel (untimed), TMA into num_stages slots of block_s keys (bf16: 32 KiB at 128).
_DECODE_CONFIGS = flags.DEFINE_list("decode_configs", ["128:4:1:1", "128:4:8:3", "128:8:8:3", "64:4:16:3",
                                                      "256:8:4:2", "128:8:64:4:mgpu", "128:8:32:6:mgpu",
                                                      "64:8:128:8:mgpu", "256:8:32:3:mgpu"],
                                    "decode kernel tiles block_s:num_warps:blocks:num_stages[:mgpu] (blocks: key "
                                    "blocks per program or CTA, in a loop; :mgpu = the Mosaic GPU kernel, num_warps "
                                    "8: its 2 warpgroups), ...")
# On an H200 (2026-11-29) 32:64:4:1 took 0.37 ms, 64:32:8:1 0.44, 32:64:4:2 0.44, 32:64:8:1 0.47. triton_static:
# 16:64:4:1 does not spill and keeps 2 programs per SM, as 32:64:4:1 does (32 B spilled; 232 B with ":used", whose
# data-dependent trip count costs here, every slot used, what it saves sequences shorter than K keys).
_DECODE_MLA_CONFIGS = flags.DEFINE_list("decode_mla_configs", ["32:64:4:1", "32:64:4:1:used", "16:64:4:1",
                                                              "64:32:8:1", "32:64:4:2"],
                                        "decode sparse MLA tiles block_h:block_k:num_warps:num_splits[:used] (:used = "
                                        "walk_all=False: only the index blocks up to the last used slot), ...")


def _time(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(t, key):
    h, d, k = _HEADS.value, _V_DIM.value + _ROPE_DIM.value, _TOPK.value
    kq, kkv, ki = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, t, h, d), jnp.bfloat16)
    kv = jax.random.normal(kkv, (1, t, d), jnp.bfloat16)
    # Unique causal rows, one drawn at random from each of k equal strata of [0, t] (the indexer
    # never repeats a key); queries with t < k take every earlier key.
    pos = jnp.arange(t, dtype=jnp.int32)[:, None]
    j = jnp.arange(k, dtype=jnp.int32)[None, :]
    width = jnp.maximum((pos + 1) // k, 1)
    idx = j * width + (jax.random.uniform(ki, (t, k)) * width).astype(jnp.int32)
    idx = jnp.where(j <= pos, idx, -1)
    return q, kv, idx[None]


def _sparse_costs(t, idx):
    h, d, v = _HEADS.value, _V_DIM.value + _ROPE_DIM.value, _V_DIM.value
    flops = 2 * t * _TOPK.value * h * (d + v)
    nbytes = int(jnp.sum(idx >= 0)) * d * 2 + t * h * (d + v) * 2
    return flops, nbytes


def _gathered_bytes(cfg, idx):
    """Bytes the forward's programs load for a --configs entry: each head block's program gathers every used row
    itself (from L2 or HBM), so H/block_h times the unique rows _sparse_costs counts; with v_split=N each of the N
    programs gathers the whole row to score it, plus its 1/N of the value columns."""
    tiles, h, d, v = fwd_tiles(cfg), _HEADS.value, _V_DIM.value + _ROPE_DIM.value, _V_DIM.value
    split = tiles.get("v_split", 1)
    per_row = split * d * 2 + (v * 2 if split > 1 else 0)
    return int(jnp.sum(idx >= 0)) * -(-h // tiles["block_h"]) * per_row


def _row(name, t, seconds, flops, nbytes, peak_tflops=None):
    tflops, gbs = flops / seconds / 1e12, nbytes / seconds / 1e9
    row = dict(kernel=name, T=t, ms=seconds * 1e3, tflops=tflops, gbs=gbs,
               roofline=max(tflops / (peak_tflops or _PEAK_TFLOPS.value), gbs / _PEAK_GBS.value))
    print(f"{name:34s} {t:>7d} {row['ms']:>10.2f} {tflops:>8.1f} {gbs:>8.0f} {row['roofline']:>8.2f}", flush=True)
    return row


def _failure(e):
    """A config's error for the log: its type, and its message's head and tail (a compiler's error ends in its cause)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) <= 600 else text[:300] + ' ... ' + text[-300:]}"


def _tiles(cfg, flag, names, suffix=None, variant=None):
    """Keywords of a --flag entry: int fields `names` joined by ":", then optionally ":suffix" (variant=True)."""
    fields = cfg.split(":")
    extra = [[], [suffix]] if suffix else [[]]
    if len(fields) < len(names) or fields[len(names):] not in extra:
        raise ValueError(f"--{flag} entry {cfg!r}: want {':'.join(names)}{f'[:{suffix}]' if suffix else ''}")
    tiles = dict(zip(names, map(int, fields[:len(names)])))
    return tiles | {variant: len(fields) > len(names)} if suffix else tiles


def fwd_tiles(cfg):
    """sparse_mla_fwd's keywords of a --configs entry (":vN": v_split=N programs per head block; ":all": walk_all)."""
    base, _, split = cfg.removesuffix(":all").partition(":v")
    if split and not split.isdigit():
        raise ValueError(f"--configs entry {cfg!r}: want block_h:block_k:num_warps:num_stages[:vN][:all]")
    return _tiles(base, "configs", ("block_h", "block_k", "num_warps", "num_stages")) | (
        {"v_split": int(split)} if split else {}) | ({"walk_all": True} if cfg.endswith(":all") else {})


def bwd_tiles(cfg):
    """sparse_mla_bwd's keywords of a --bwd_configs entry (":split": dq and dkv in two kernels)."""
    return _tiles(cfg, "bwd_configs", ("block_h", "block_k", "num_warps", "num_stages"), "split", "split_dkv")


def _mgpu_tiles(cfg, flag, names, warpgroups):
    """Keywords of a --flag entry ending in ":mgpu" (a Mosaic GPU kernel of `warpgroups` warpgroups: num_warps must
    say so, and is not passed on), else None."""
    if not cfg.endswith(":mgpu"):
        return None
    tiles = _tiles(cfg.removesuffix(":mgpu"), flag, names)
    if tiles.pop("num_warps") != 4 * warpgroups:
        raise ValueError(f"--{flag} entry {cfg!r}: a :mgpu config runs {warpgroups} warpgroups, num_warps "
                         f"{4 * warpgroups}")
    return tiles | {"mosaic_gpu": True}


def index_tiles(cfg):
    """indexer_topk_triton's keywords of an --index_configs entry (":loop": the Triton key-loop kernel; ":mgpu": the
    Mosaic GPU kernel, block_t queries per consumer warpgroup, num_stages key slots, num_warps 12: its 3 warpgroups)."""
    names = ("block_t", "block_s", "num_warps", "num_stages")
    return (_mgpu_tiles(cfg, "index_configs", names, 3)
            or _tiles(cfg, "index_configs", names, "loop", "key_loop"))


def index_kind(cfg):
    """The kernel an --index_configs entry runs: "grid", "key-loop" or "mosaic-gpu"."""
    tiles = index_tiles(cfg)
    return "mosaic-gpu" if tiles.get("mosaic_gpu") else "key-loop" if tiles["key_loop"] else "grid"


def topk_tiles(cfg):
    """select_topk_triton's keywords of a --topk_configs entry."""
    return _tiles(cfg, "topk_configs", ("block", "num_warps"))


def decode_tiles(cfg):
    """The decode indexer's keywords of a --decode_configs entry (":mgpu": the Mosaic GPU kernel, num_warps 8)."""
    names = ("block_s", "num_warps", "blocks", "num_stages")
    return _mgpu_tiles(cfg, "decode_configs", names, 2) or _tiles(cfg, "decode_configs", names)


def decode_mla_tiles(cfg):
    """sparse_mla_decode_triton's keywords of a --decode_mla_configs entry (":used": walk_all=False)."""
    tiles = _tiles(cfg, "decode_mla_configs", ("block_h", "block_k", "num_warps", "num_splits"), "used", "walk_used")
    return tiles | {"walk_all": not tiles.pop("walk_used")}


def _index_label(cfg):
    return f"{index_kind(cfg)} [{cfg}]"


def _indexer_split(t, q, kk, ww, cfg):
    """Rows for one chunk of the indexer at length t: scores kernel alone, then top-k alone on its scores."""
    h, d, k = _INDEX_HEADS.value, _INDEX_DIM.value, _TOPK.value
    chunk = min(_INDEX_CHUNK.value, t)
    q_c, w_c = q[:, t - chunk:], ww[:, t - chunk:]
    positions = jnp.arange(t - chunk, t, dtype=jnp.int32)
    ones, k_len = jnp.ones((1, t), jnp.float32), jnp.full((1,), t, jnp.int32)
    tiles = index_tiles(cfg)
    scores = indexer_scores_mosaic_gpu if tiles.pop("mosaic_gpu", False) else indexer_scores_triton
    scores_fn = jax.jit(lambda q_c, kk, w_c: scores(q_c, kk, w_c, ones, k_len, positions, interpret=_INTERPRET.value,
                                                    **tiles))
    scores = scores_fn(q_c, kk, w_c)[0]  # [chunk, t] float32
    select = jax.jit(lambda x: topk_lib.select_topk(x, k))
    lax_topk = jax.jit(lambda x: jax.lax.top_k(x, min(k, t))[1])
    vals, idx = jax.lax.top_k(scores, min(k, t))
    selected = select(scores)
    got, want = jnp.sort(selected, axis=-1), jnp.sort(jnp.where(vals > -jnp.inf, idx, -1), axis=-1)
    print(f"top-k at T={t}: select_topk == lax.top_k sets: {bool(jnp.all(got[:, -want.shape[1]:] == want))}; "
          f"sampled path: {bool(jnp.all(topk_lib.sampled_rows_ok(scores, k)))}", flush=True)
    nbytes = chunk * t * 4
    rows = [_row(f"indexer scores only {_index_label(cfg)} 1 chunk", t, _time(scores_fn, q_c, kk, w_c),
                 2 * chunk * t * h * d, nbytes),
            _row(f"top-k select_topk [{chunk}xT] 1 chunk", t, _time(select, scores), 0, nbytes),
            _row(f"top-k lax.top_k [{chunk}xT] 1 chunk", t, _time(lax_topk, scores), 0, nbytes)]
    for topk_cfg in _TOPK_CONFIGS.value:  # the top-k kernel: checked equal to select_topk (order too), then timed
        kernel = jax.jit(functools.partial(select_topk_triton, k=k, interpret=_INTERPRET.value,
                                           **topk_tiles(topk_cfg)))
        try:
            same = bool(jnp.all(kernel(scores) == selected))
        except Exception as e:  # noqa: BLE001 (a tile config Triton cannot compile: any error)
            print(f"top-k kernel [{topk_cfg}]: failed ({_failure(e)})", flush=True)
            continue
        print(f"top-k kernel [{topk_cfg}] at T={t}: equal to select_topk: {same}", flush=True)
        rows.append(_row(f"top-k kernel [{topk_cfg}] [{chunk}xT] 1 chunk", t, _time(kernel, scores), 0, nbytes))
    return rows


def _indexer(prefill_seconds):
    """Times the indexer kernel + chunked top-k (and the reference), plus indexer + sparse_mla against dense
    attention where prefill_seconds ({T: {"sparse_mla": s, "dense": s}}) has T."""
    h, d, k = _INDEX_HEADS.value, _INDEX_DIM.value, _TOPK.value
    rows = []

    def inputs(t):
        kq, kk, kw = jax.random.split(jax.random.PRNGKey(11 + t), 3)
        return (jax.random.normal(kq, (1, t, h, d), jnp.bfloat16), jax.random.normal(kk, (1, t, d), jnp.bfloat16),
                jax.random.normal(kw, (1, t, h), jnp.float32))

    def kernel_fn(cfg, segments=8, topk_kernel=True):
        tiles = index_tiles(cfg)
        return jax.jit(lambda q, kk, ww: indexer_topk_triton(q, kk, ww, topk=k, segments=segments,
                                                             topk_kernel=topk_kernel, interpret=_INTERPRET.value,
                                                             **tiles))

    flops = lambda t: 2 * (t * (t + 1) // 2) * h * d
    nbytes = lambda t: t * h * d * 2 + t * d * 2 + t * k * 4
    # FP8 e4m3 q and k (V3.2's indexer inputs; unit key scales) on Hopper's fp8 MMA: 1 byte each.
    nbytes8 = lambda t: nbytes(t) - (t * h * d + t * d)
    # Index sets are compared sorted: the kernels list them ascending, the reference by score.
    agreement = lambda got, ref: float(jnp.mean(jnp.sort(got, axis=-1) == jnp.sort(ref, axis=-1)))

    def check_and_sweep(configs, dtype, label, bytes_at):
        """{config: seconds at --sweep_len} of the configs that ran, each first checked at --check_len."""
        q, kk, ww = inputs(_CHECK_LEN.value)
        q, kk = q.astype(dtype), kk.astype(dtype)
        want, ran = indexer_topk_reference(q, kk, ww, topk=k), []
        for cfg in configs:
            try:
                agree = agreement(kernel_fn(cfg)(q, kk, ww), want)
            except Exception as e:  # noqa: BLE001 (a tile config Triton cannot compile: any error)
                print(f"indexer {label}config {cfg}: failed ({_failure(e)})", flush=True)
                continue
            print(f"indexer {label}[{cfg}] agreement with the reference's index sets at T={_CHECK_LEN.value}: "
                  f"{agree:.4f}", flush=True)
            ran.append(cfg)
        q, kk, ww = inputs(_SWEEP_LEN.value)
        q, kk = q.astype(dtype), kk.astype(dtype)
        sweep = {}
        for cfg in ran:
            sweep[cfg] = _time(kernel_fn(cfg), q, kk, ww)
            rows.append(_row(f"indexer_topk pallas {label}{_index_label(cfg)}", _SWEEP_LEN.value, sweep[cfg],
                             flops(_SWEEP_LEN.value), bytes_at(_SWEEP_LEN.value)))
        return sweep

    sweep = check_and_sweep(_INDEX_CONFIGS.value, jnp.bfloat16, "", nbytes)
    sweep8 = check_and_sweep(_INDEX_FP8_CONFIGS.value, jnp.float8_e4m3fn, "fp8 ", nbytes8)
    if not sweep:
        return rows
    best = min(sweep, key=sweep.get)
    # The fastest config of each kernel (grid, key-loop, mosaic-gpu): each is timed at every length.
    bests = {}
    for cfg in sorted(sweep, key=sweep.get):
        bests.setdefault(index_kind(cfg), cfg)
    if len(bests) > 1:
        print(f"indexer at T={_SWEEP_LEN.value}: " + ", ".join(
            f"{kind} [{cfg}] {sweep[cfg] * 1e3:.2f} ms ({sweep[cfg] / sweep[best]:.2f}x the fastest)"
            for kind, cfg in bests.items()), flush=True)
    reference = jax.jit(lambda q, kk, ww: indexer_topk_reference(q, kk, ww, topk=k))
    for t in (int(x) for x in _SEQ_LENS.value):
        q, kk, ww = inputs(t)
        per_kernel = {cfg: _time(kernel_fn(cfg), q, kk, ww) for cfg in bests.values()}
        rows += [_row(f"indexer_topk pallas {_index_label(cfg)}", t, sec, flops(t), nbytes(t))
                 for cfg, sec in per_kernel.items()]
        if _INDEX_VARIANTS.value:
            # The baseline of the causal runs: every chunk scored and top-k'd against all T keys.
            one_run = _time(kernel_fn(best, segments=1), q, kk, ww)
            rows.append(_row(f"indexer_topk pallas 1 run {_index_label(best)}", t, one_run, flops(t), nbytes(t)))
            print(f"indexer at T={t}: causal runs {one_run / per_kernel[best]:.2f}x faster than 1 run", flush=True)
            # The top-k by select_topk (XLA) in place of the top-k kernel (select_topk_triton, default tiles).
            radix = _time(kernel_fn(best, topk_kernel=False), q, kk, ww)
            rows.append(_row(f"indexer_topk pallas select_topk {_index_label(best)}", t, radix, flops(t), nbytes(t)))
            print(f"indexer at T={t}: the top-k kernel {radix / per_kernel[best]:.2f}x faster than select_topk",
                  flush=True)
        if sweep8:  # the fastest fp8 tiles
            best8 = min(sweep8, key=sweep8.get)
            q8, k8 = q.astype(jnp.float8_e4m3fn), kk.astype(jnp.float8_e4m3fn)
            rows.append(_row(f"indexer_topk pallas fp8 {_index_label(best8)}", t, _time(kernel_fn(best8), q8, k8, ww),
                             flops(t), nbytes8(t)))
            del q8, k8
        if t <= _MAX_REF.value:
            rows.append(_row("indexer_topk xla reference", t, _time(reference, q, kk, ww), flops(t), nbytes(t)))
        if t in prefill_seconds:  # DSA's prefill attention: the fastest indexer (bf16) + the fastest forward
            dsa, dense = min(per_kernel.values()) + prefill_seconds[t]["sparse_mla"], prefill_seconds[t]["dense"]
            rows.append(_row("indexer + sparse_mla (pallas)", t, dsa, flops(t), nbytes(t)))
            print(f"DSA at T={t}: indexer + sparse_mla {dsa * 1e3:.1f} ms vs cuDNN dense causal {dense * 1e3:.1f} ms: "
                  f"{dense / dsa:.2f}x faster (target: 3x at 64K)", flush=True)
        if _INDEX_VARIANTS.value:
            rows += _indexer_split(t, q, kk, ww, best)
    return rows


def _decode():
    """Decode indexer rows: the kernel on the last layer of a stacked cache [L, B, S, D], against the old path.

    Every key is valid (k_len = S), so the kernel reads the whole layer: bytes = B·S·(D·itemsize + 4
    for FP8's per-key scale); FLOPs = 2·B·T·S·H·D (FP8 rows against twice --peak_tflops, the FP8
    rate perf_targets.md assumes). Baselines, each on the layer sliced out of the cache (the copy
    the kernel avoids): the XLA reference (`indexer_topk_decode_reference`, the CPU path), and the
    prefill Triton kernel called once per query with q_offset = S - 1 (what cached_mla_attention
    ran on GPU before `ops.indexer_topk_decode`). Agreement: the fraction of equal entries of the
    sorted index sets, kernel vs reference.
    """
    b, s, t, n_layers = _DECODE_BATCH.value, _DECODE_LEN.value, _DECODE_QUERIES.value, _DECODE_LAYERS.value
    h, d, k = _INDEX_HEADS.value, _INDEX_DIM.value, _TOPK.value
    kq, kk, kw, ks = jax.random.split(jax.random.PRNGKey(5), 4)
    layer, k_len = jnp.int32(n_layers - 1), jnp.full((b, t), s, jnp.int32)
    w = jax.random.normal(kw, (b, t, h), jnp.float32)
    flops = 2 * b * t * s * h * d
    agreement = lambda got, ref: float(jnp.mean(jnp.sort(got, axis=-1) == jnp.sort(ref, axis=-1)))

    def kernel_fn(cfg, scores_only=False, topk_kernel=False):
        tiles = decode_tiles(cfg)
        if scores_only:
            fn = indexer_scores_decode_mosaic_gpu if tiles.pop("mosaic_gpu", False) else indexer_scores_decode_triton
        else:
            fn = functools.partial(indexer_topk_decode_triton, topk=k, topk_kernel=topk_kernel)
        fn = functools.partial(fn, interpret=_INTERPRET.value, **tiles)
        return jax.jit(lambda q, kc, w, layer, kl, ks: fn(q, kc, w, layer, kl, k_scale=ks))

    reference = jax.jit(lambda q, kc, w, layer, kl, ks: indexer_topk_decode_reference(q, kc, w, layer, kl, topk=k,
                                                                                        k_scale=ks))
    per_query = jax.jit(lambda q, kc, w, layer, kl, ks: jnp.concatenate([
        indexer_topk_triton(q[:, i:i + 1], kc[layer], w[:, i:i + 1], topk=k, k_scale=None if ks is None else ks[layer],
                            q_offset=s - 1, k_len=kl[:, i], interpret=_INTERPRET.value) for i in range(t)], axis=1))

    rows, configs = [], _DECODE_CONFIGS.value
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    cache = jax.random.normal(kk, (n_layers, b, s, d), jnp.bfloat16)
    for name in ("bf16", "fp8"):  # the tiles are swept in bf16; fp8 runs the best of each kernel
        scale = None
        if name == "fp8":  # e4m3 keys and queries with per-key scales (the model's index_fp8 cache)
            q, cache = q.astype(jnp.float8_e4m3fn), cache.astype(jnp.float8_e4m3fn)
            scale = jax.random.uniform(ks, (n_layers, b, s), jnp.float32, 0.5, 2.0)
        args = (q, cache, w, layer, k_len, scale)
        nbytes = b * s * (d * cache.dtype.itemsize + (4 if scale is not None else 0))
        peak = _PEAK_TFLOPS.value * (2 if name == "fp8" else 1)
        label = f"B{b} T{t} {name}"
        sweep, fns, want = {}, {}, reference(*args)
        for cfg in configs:
            try:
                fns[cfg] = kernel_fn(cfg)
                agree = agreement(fns[cfg](*args), want)
                sweep[cfg] = _time(fns[cfg], *args)
            except Exception as e:  # noqa: BLE001 (a tile config that does not compile: any error)
                print(f"decode config {cfg}: failed ({_failure(e)})", flush=True)
                continue
            print(f"decode indexer [{cfg}] {label}: agreement with the reference's index sets {agree:.4f}", flush=True)
            rows.append(_row(f"decode indexer pallas [{cfg}] {label}", s, sweep[cfg], flops, nbytes, peak))
        if not sweep:
            return rows
        best = min(sweep, key=sweep.get)
        # fp8: the fastest Triton and the fastest Mosaic GPU tiles
        configs = list({decode_tiles(cfg).get("mosaic_gpu", False): cfg
                        for cfg in sorted(sweep, key=sweep.get, reverse=True)}.values())
        rows.append(_row(f"decode scores only [{best}] {label}", s, _time(kernel_fn(best, scores_only=True), *args),
                         flops, nbytes, peak))
        fused = kernel_fn(best, topk_kernel=True)  # the top-k kernel in place of select_topk: same indices
        print(f"decode indexer [{best}] {label}: the top-k kernel equals select_topk: "
              f"{bool(jnp.all(fused(*args) == fns[best](*args)))}", flush=True)
        rows.append(_row(f"decode indexer topk kernel [{best}] {label}", s, _time(fused, *args), flops, nbytes, peak))
        rows.append(_row(f"decode old: xla reference {label}", s, _time(reference, *args), flops, nbytes, peak))
        rows.append(_row(f"decode old: prefill kernel/query {label}", s, _time(per_query, *args), flops, nbytes,
                         peak))
    return rows


def _decode_attention(scale, v):
    """Decode sparse MLA rows: the kernel on the last layer of a stacked latent cache [L, B, S, D], against the
    old path.

    Each query selects k unique rows, one drawn at random from each of k equal strata of [0, S)
    (all valid). Bytes = B·T·k·D·2 (the rows, each read once) + q (B·T·H·D·2) + out (B·T·H·V·2);
    FLOPs = 2·B·T·k·H·(D + V) (FlashMLA's count). Baselines: the old path (an XLA gather of the rows
    into [B, T·k, D], `gather_decode_rows`, then `sparse_mla_fwd`, the prefill Triton kernel, over them:
    what cached_mla_attention ran before `ops.sparse_mla_decode`) and the XLA reference. Before
    timing, each tile's output is compared with the reference's on the device (max abs error; bf16).
    """
    b, s, t, n_layers = _DECODE_BATCH.value, _DECODE_LEN.value, _DECODE_QUERIES.value, _DECODE_LAYERS.value
    h, d, k = _HEADS.value, _V_DIM.value + _ROPE_DIM.value, _TOPK.value
    if s < k:
        raise SystemExit(f"--decode_len ({s}) must be >= --topk ({k}): every query selects k distinct rows")
    kq, kkv, ki = jax.random.split(jax.random.PRNGKey(6), 3)
    layer = jnp.int32(n_layers - 1)
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    cache = jax.random.normal(kkv, (n_layers, b, s, d), jnp.bfloat16)
    width = s // k
    idx = (jnp.arange(k, dtype=jnp.int32) * width + (jax.random.uniform(ki, (b, t, k)) * width).astype(jnp.int32))
    args = (q, cache, layer, idx)
    flops = 2 * b * t * k * h * (d + v)
    nbytes = b * t * k * d * 2 + b * t * h * (d + v) * 2
    label = f"B{b} T{t} H{h} k{k}"

    def row(name, seconds):
        out = _row(f"{name} {label}", s, seconds, flops, nbytes)
        out["hbm_roofline"] = out["gbs"] / _PEAK_GBS.value
        return out

    def kernel_fn(cfg):
        return jax.jit(functools.partial(sparse_mla_decode_triton, scale=scale, v_dim=v, interpret=_INTERPRET.value,
                                         **decode_mla_tiles(cfg)))

    reference = jax.jit(lambda q, kv, layer, idx: sparse_mla_decode_reference(q, kv, layer, idx, scale=scale, v_dim=v))

    @jax.jit
    def old_path(q, kv, layer, idx):
        rows, local = gather_decode_rows(kv, layer, idx)
        return sparse_mla_fwd(q, rows, local, scale=scale, v_dim=v, interpret=_INTERPRET.value)[0]

    want = reference(*args).astype(jnp.float32)
    rows, errors = [], {}
    for cfg in _DECODE_MLA_CONFIGS.value:
        try:
            fn = kernel_fn(cfg)
            errors[cfg] = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - want)))
            rows.append(row(f"decode sparse_mla pallas [{cfg}]", _time(fn, *args)))
        except Exception as e:  # noqa: BLE001 (a tile config Triton cannot compile: any error)
            print(f"decode sparse_mla config {cfg}: failed ({_failure(e)})", flush=True)
    print(f"decode sparse_mla max abs error vs the XLA reference (bf16) per config: {errors}", flush=True)
    rows.append(row("decode sparse_mla old: gather + prefill kernel", _time(old_path, *args)))
    rows.append(row("decode sparse_mla xla reference", _time(reference, *args)))
    return rows


def _backward(scale, v):
    """Checks the backward kernel against the reference VJP on the device, then times it."""
    rows = []
    d = _V_DIM.value + _ROPE_DIM.value
    check_len = _CHECK_LEN.value

    def kernel_fn(cfg, head_major=True):
        return jax.jit(functools.partial(sparse_mla_bwd, scale=scale, v_dim=v, head_major=head_major,
                                         interpret=_INTERPRET.value, **bwd_tiles(cfg)))

    for t in (check_len, _BWD_LEN.value):
        q, kv, idx = _inputs(t, jax.random.PRNGKey(7 + t))
        out, lse = sparse_mla_fwd(q, kv, idx, scale=scale, v_dim=v, interpret=_INTERPRET.value)
        d_out = jax.random.normal(jax.random.PRNGKey(8), out.shape, out.dtype)
        flops = 2 * t * _TOPK.value * _HEADS.value * (3 * d + 2 * v)
        nbytes = 2 * _sparse_costs(t, idx)[1]
        if t == check_len:
            _, vjp = jax.vjp(lambda a, b: sparse_mla_reference(a, b, idx, scale=scale, v_dim=v),
                             q.astype(jnp.float32), kv.astype(jnp.float32))
            want = vjp(d_out.astype(jnp.float32))
        timed = {}
        for cfg in _BWD_CONFIGS.value:
            fn = kernel_fn(cfg)
            try:
                if t == check_len:
                    got = fn(q, kv, idx, out, lse, d_out)
                    errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / float(jnp.max(jnp.abs(r))))
                            for g, r in zip(got, want)]
                    print(f"backward [{cfg}] relative max error vs reference VJP: dq {errs[0]:.2e} dkv {errs[1]:.2e}",
                          flush=True)
                    continue
                timed[cfg] = _time(fn, q, kv, idx, out, lse, d_out)
                rows.append(_row(f"sparse_mla bwd pallas [{cfg}]", t, timed[cfg], flops, nbytes))
            except Exception as e:
                print(f"backward config {cfg}: failed ({_failure(e)})", flush=True)
        if timed:  # the launch order first measured, for the fastest config
            best = min(timed, key=timed.get)
            rows.append(_row(f"sparse_mla bwd pallas query-major [{best}]", t,
                             _time(kernel_fn(best, head_major=False), q, kv, idx, out, lse, d_out), flops, nbytes))
        if t != check_len and t <= _MAX_REF_BWD.value:  # the reference's VJP keeps every gathered row
            ref_bwd = jax.jit(lambda q, kv, d_out: jax.vjp(
                lambda a, b: sparse_mla_reference(a, b, idx, scale=scale, v_dim=v), q, kv)[1](d_out))
            rows.append(_row("sparse_mla bwd xla reference (vjp)", t, _time(ref_bwd, q, kv, d_out), flops, nbytes))
    return rows


def _sparse_mla_forward(scale, v):
    """Checks the forward tile configs against the reference, then times the best against the baselines.

    Returns (rows, {T: {"sparse_mla": best forward seconds, "dense": cuDNN seconds}}, best config,
    {config: max abs error})."""

    def kernel_fn(cfg, head_major=True):
        fwd = functools.partial(sparse_mla_fwd, scale=scale, v_dim=v, head_major=head_major, interpret=_INTERPRET.value,
                                **fwd_tiles(cfg))
        return jax.jit(lambda q, kv, idx: fwd(q, kv, idx)[0])

    q, kv, idx = _inputs(_CHECK_LEN.value, jax.random.PRNGKey(0))
    ref = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=scale, v_dim=v)
    check = {}
    for cfg in _CONFIGS.value:
        try:
            out = kernel_fn(cfg)(q, kv, idx)
        except Exception as e:  # a tile config Triton cannot compile (registers, shared memory)
            print(f"config {cfg}: failed to compile ({type(e).__name__}: {str(e)[:300]})", flush=True)
            continue
        check[cfg] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    print(f"correctness vs f32 reference (T={_CHECK_LEN.value}, bf16 inputs), max abs error per config:", check,
          flush=True)
    configs = [c for c, err in check.items() if err < 0.05]
    if not configs:
        raise SystemExit("no tile config compiled and matched the reference")

    rows = []
    q, kv, idx = _inputs(_SWEEP_LEN.value, jax.random.PRNGKey(1))
    flops, nbytes = _sparse_costs(_SWEEP_LEN.value, idx)
    sweep, gathered = {}, {}
    for cfg in configs:
        try:
            sweep[cfg] = _time(kernel_fn(cfg), q, kv, idx)
        except Exception as e:  # a tile config Triton cannot fit (registers, shared memory)
            print(f"config {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        rows.append(_row(f"sparse_mla pallas [{cfg}]", _SWEEP_LEN.value, sweep[cfg], flops, nbytes))
        rows[-1]["gathered_gbs"] = gathered[cfg] = round(_gathered_bytes(cfg, idx) / sweep[cfg] / 1e9)
    # Tiles whose FLOP rates differ but whose gathered rates agree are bound by the gathers (L2 -> SM), not the math.
    print("sparse_mla gathered GB/s per config (the rows every head-block program loads):", gathered, flush=True)
    best = min(sweep, key=sweep.get)
    kernel, query_major = kernel_fn(best), kernel_fn(best, head_major=False)
    reference = jax.jit(lambda q, kv, idx: sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v))
    dense = jax.jit(lambda q, k, vv: jax.nn.dot_product_attention(q, k, vv, is_causal=True,
                                                                  implementation="cudnn" if jax.default_backend() == "gpu" else None))
    prefill_seconds = {}
    for t in (int(x) for x in _SEQ_LENS.value):
        q, kv, idx = _inputs(t, jax.random.PRNGKey(t))
        flops, nbytes = _sparse_costs(t, idx)
        seconds = _time(kernel, q, kv, idx)
        rows.append(_row(f"sparse_mla pallas [{best}]", t, seconds, flops, nbytes))
        # The launch order first measured: every query of a head block before the next head block.
        old_order = _time(query_major, q, kv, idx)
        rows.append(_row(f"sparse_mla pallas query-major [{best}]", t, old_order, flops, nbytes))
        print(f"sparse_mla at T={t}: head-major launch {old_order / seconds:.2f}x faster than query-major", flush=True)
        if t <= _MAX_REF.value:
            rows.append(_row("sparse_mla xla reference", t, _time(reference, q, kv, idx), flops, nbytes))
        del q, kv, idx
        h = _HEADS.value
        qd = jax.random.normal(jax.random.PRNGKey(2), (1, t, h, 192), jnp.bfloat16)
        dense_flops = t * t * h * (192 + 128)
        dense_bytes = 4 * t * h * 192 * 2
        dense_seconds = _time(dense, qd, qd, qd)
        rows.append(_row("dense causal MHA (cuDNN, 192/128)", t, dense_seconds, dense_flops, dense_bytes))
        prefill_seconds[t] = {"sparse_mla": seconds, "dense": dense_seconds}
        del qd
    return rows, prefill_seconds, best, check


def main(argv):
    del argv
    parts = set(_PARTS.value)
    if not parts <= set(_PART_NAMES):
        raise SystemExit(f"--parts: expected a subset of {_PART_NAMES}, got {_PARTS.value}")
    v, scale = _V_DIM.value, (_V_DIM.value + _ROPE_DIM.value) ** -0.5
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    print(f"{'kernel':34s} {'T':>7s} {'ms':>10s} {'TFLOP/s':>8s} {'GB/s':>8s} {'roofline':>8s}")
    rows, prefill_seconds, best, check = [], {}, None, {}
    if "decode" in parts:
        rows += _decode()
    if "decode_mla" in parts:
        rows += _decode_attention(scale, v)
    if "sparse_mla" in parts:
        fwd_rows, prefill_seconds, best, check = _sparse_mla_forward(scale, v)
        rows += fwd_rows
    elif _PREFILL_FROM.value:  # the forward and dense timings of an earlier --parts=sparse_mla run
        with open(_PREFILL_FROM.value) as f:
            prefill_seconds = {int(t): seconds for t, seconds in json.load(f)["prefill_seconds"].items()}
    if "indexer" in parts:
        rows += _indexer(prefill_seconds)
    if "backward" in parts:
        rows += _backward(scale, v)
    with open(_OUT.value, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, best_config=best, check=check,
                       prefill_seconds=prefill_seconds, rows=rows), f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
