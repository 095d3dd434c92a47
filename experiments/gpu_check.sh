#!/usr/bin/env bash
# One GPU check, run from the repo root on a machine with JAX (CUDA), flax, optax: installs
# nothing. Correctness first, then timing. Results land in ${OUT:-/tmp/gpu_check}: one log of
# everything printed (gpu_check_PART.log, kept when a step hits its cap) and one JSON per step.
#   bash experiments/gpu_check.sh            model, then kernels (up to 12 minutes of caps: run them apart within
#                                            a 10-minute device call)
#   bash experiments/gpu_check.sh model      model correctness (GPU vs the CPU oracle) + bench_attention
#   bash experiments/gpu_check.sh kernels    DSA kernels at their default tiles: each checked on the device against
#                                            its reference, then timed against its baselines (at most 5 minutes of caps)
#   bash experiments/gpu_check.sh sweep      the tile and variant sweeps that pick those defaults, at T = 16K and 64K,
#                                            and the Mosaic GPU indexers against them (at most 9 minutes of caps)
#   bash experiments/gpu_check.sh fuzz       the compiled Triton kernels on random odd-sized cases and random tiles against
#                                            their references (experiments/fuzz_kernels.py; 8 per kernel, 180 s cap)
# A 15-minute device budget (machine start included) holds 'sweep' (it times the default tiles too) and then 'fuzz',
# as two calls; not 'kernels' and 'sweep' both. Each step prints its seconds: on 2026-11-29 (H200, jax 0.11.2) the
# sweep's prefill step, sparse MLA and indexer in one process, ran past its 220 s cap in the indexer; they are two
# steps now, the indexer reading the forward and dense timings from the first step's JSON (--prefill_from).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PART=${1:-all}
case $PART in
  all|model|kernels|sweep|fuzz) ;;
  *) echo "gpu_check.sh: unknown part '$PART' (expected all, model, kernels, sweep or fuzz)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
LOG=$OUT/gpu_check_$PART.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DEEPSEEK_JAX_COMPILE_CACHE=/tmp/jax_cache
# step NAME CAP COMMAND...: runs the command under a cap of CAP seconds, its output (less XLA's W/I lines) into the log.
step() {
  local name=$1 cap=$2 start=$SECONDS
  shift 2
  echo "== $name ==" | tee -a "$LOG"
  timeout "$cap" "$@" 2>&1 | grep -v "^W\|^I" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: rc $rc, $((SECONDS - start)) s of its $cap s cap" | tee -a "$LOG"
}
{ nvidia-smi -L; python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } \
  2>&1 | tee -a "$LOG"

if [[ $PART == all || $PART == model ]]; then
  tests="tests/test_attention.py"
  if python3 -c "import transformers.models.deepseek_v32" 2>/dev/null; then
    tests="$tests tests/test_hf_parity.py"
  else
    echo "transformers has no deepseek_v32 here: HF parity skipped" | tee -a "$LOG"
  fi
  step "model correctness (JAX on GPU, fp32 HIGHEST matmuls)" 180 env JAX_PLATFORMS=cuda,cpu \
    JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -x -p no:cacheprovider $tests
  step "timing: attention block, sparse vs dense, bf16, small preset" 120 python3 -m experiments.bench_attention \
    --preset=small --dtype=bfloat16 --topk=2048 --repeats=5 --seq_lens=4096,8192,16384,32768,65536 \
    --max_dense_bytes=2e10 --out="$OUT/bench_attention_small.json"
  step "timing: attention block, sparse vs dense, bf16, V3.2 preset" 120 python3 -m experiments.bench_attention \
    --preset=v32-671b --dtype=bfloat16 --topk=2048 --repeats=5 --seq_lens=4096,8192,16384,32768 \
    --max_dense_bytes=2e10 --out="$OUT/bench_attention_v32.json"
fi

# Kernels: "kernels" times the defaults only (one tile config per kernel), "sweep" every config.
if [[ $PART == all || $PART == kernels ]]; then
  caps=(40 35 60 110 55)
  tiles=(--decode_configs=128:4:1:1 --decode_mla_configs=32:64:4:1 --configs=32:64:4:2 --index_configs=2:128:8:2:loop
         --index_fp8_configs=2:128:8:2:loop --topk_configs=4096:8 --bwd_configs=32:32:8:2 --seq_lens=16384,65536
         --noindex_variants)
elif [[ $PART == sweep ]]; then
  # The Mosaic GPU indexers (untimed; kernels of barriers, so steps of their own: a hang costs only their cap)
  # against the Triton default in the same run, beside the Triton tiles (the prefill ones with their variants). The
  # backward's tiles were settled on 2026-11-29: 'kernels' times it.
  caps=(50 45 120 100 180 45)
  tiles=(--seq_lens=16384,65536)
  decode_triton=(--decode_configs=128:4:1:1,128:4:8:3,128:8:8:3,64:4:16:3,256:8:4:2)
  decode_mgpu=(--decode_configs=128:8:64:4:mgpu,128:8:32:6:mgpu,64:8:128:8:mgpu,256:8:32:3:mgpu,128:4:1:1)
  mgpu=(--index_configs=2:128:12:3:mgpu,4:64:12:3:mgpu,2:64:12:4:mgpu,2:128:8:2:loop
        --index_fp8_configs=2:128:12:4:mgpu,4:64:12:4:mgpu,2:128:8:2:loop --noindex_variants)
  triton=(--index_configs=2:128:8:2:loop,2:128:8:3:loop,4:128:8:2
          --index_fp8_configs=2:128:8:2:loop,4:128:8:2:loop,2:256:8:2:loop,4:256:8:2:loop)
fi
if [[ $PART == all || $PART == kernels || $PART == sweep ]]; then
  # bench NAME CAP PARTS JSON [FLAGS...]: bench_kernels --parts=PARTS, its JSON in $OUT/bench_kernels_JSON.json.
  bench() { local name=$1 cap=$2 parts=$3 json=$4; shift 4
    step "$name" "$cap" python3 -m experiments.bench_kernels --parts="$parts" "${tiles[@]}" \
      --out="$OUT/bench_kernels_$json.json" "$@"; }
  # mgpu_dump COMMAND...: ptxas' report (registers, spills) of each Mosaic GPU kernel it compiles, printed into the
  # log ("ptxas info" lines; Mosaic GPU's MOSAIC_GPU_DUMP_PTXAS). Not MOSAIC_GPU_DUMP_TO: setting it turns on every
  # dump (the module before and after each MLIR pass, PTX, SASS), far too much for a device call.
  mgpu_dump() { MOSAIC_GPU_DUMP_PTXAS=1 "$@"; }
  if [[ $PART == sweep ]]; then
    bench "decode indexer, Triton tiles (B=64, S=128K, T=1) on the stacked cache vs the old path (layer slice)" \
      "${caps[0]}" decode decode "${decode_triton[@]}"
    mgpu_dump bench "decode indexer, Mosaic GPU tiles vs the Triton default" "${caps[5]}" decode decode_mgpu \
      "${decode_mgpu[@]}"
  else
    bench "decode indexer (B=64, S=128K, T=1) on the stacked cache vs the old path (layer slice)" "${caps[0]}" decode \
      decode
  fi
  bench "decode sparse MLA (H=128, k=2048) on the stacked cache vs the old path (XLA gather + prefill kernel)" \
    "${caps[1]}" decode_mla decode_mla
  bench "sparse MLA forward: check on the device, then time against the XLA reference and cuDNN dense" \
    "${caps[2]}" sparse_mla sparse_mla
  prefill=()  # the forward step's timings, unless it wrote none (cut by its cap)
  [[ -f $OUT/bench_kernels_sparse_mla.json ]] && prefill=(--prefill_from="$OUT/bench_kernels_sparse_mla.json")
  if [[ $PART == sweep ]]; then
    mgpu_dump bench "indexer + top-k, Mosaic GPU scores vs the Triton default: check, then time; DSA vs cuDNN dense" \
      "${caps[3]}" indexer indexer_mgpu "${prefill[@]}" "${mgpu[@]}"
    bench "indexer + top-k, Triton tiles and variants: check, then time; DSA vs cuDNN dense" "${caps[4]}" indexer \
      indexer "${prefill[@]}" "${triton[@]}"
  else
    bench "indexer + top-k: check, then time; DSA (indexer + sparse MLA) against cuDNN dense" "${caps[3]}" indexer \
      indexer "${prefill[@]}"
    bench "sparse MLA backward: check against the reference VJP, then time" "${caps[4]}" backward backward
  fi
fi

if [[ $PART == fuzz ]]; then
  step "random cases: compiled Triton kernels vs their references" 180 python3 -m experiments.fuzz_kernels \
    --fuzz_impls=triton --fuzz_cases=8 --fuzz_out="$OUT/fuzz_kernels.json"
fi
