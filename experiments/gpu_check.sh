#!/usr/bin/env bash
# One GPU check, run from the repo root on a machine with JAX (CUDA), flax, optax: installs
# nothing. Correctness first, then timing. Results land in ${OUT:-/tmp/gpu_check}.
#   bash experiments/gpu_check.sh            model, then kernels (up to 12 minutes of caps: run them apart within
#                                            a 10-minute device call)
#   bash experiments/gpu_check.sh model      model correctness (GPU vs the CPU oracle) + bench_attention
#   bash experiments/gpu_check.sh kernels    DSA kernels at their default tiles, under 5 minutes: each checked on the
#                                            device against its reference, then timed against its baselines (decode
#                                            indexer 60 s, decode attention 60 s, prefill 110 s, backward 60 s caps)
#   bash experiments/gpu_check.sh sweep      the tile and variant sweeps that pick those defaults (key-loop indexer,
#                                            top-k kernel, value-split forward, split-dkv backward, ...): decode 120 s,
#                                            decode attention 120 s, prefill 220 s, backward 110 s caps, at most 9.5
#                                            minutes
#   bash experiments/gpu_check.sh fuzz       the compiled Triton kernels on random odd-sized cases and random tiles against
#                                            their references (experiments/fuzz_kernels.py; 10 per kernel, 180 s cap)
# A 15-minute device budget (machine start included) holds 'sweep' (it times the default tiles too) and then 'fuzz',
# as two calls; not 'kernels' and 'sweep' both. The CPU tests of these kernels pass on JAX 0.10.2, 0.11.2 (the H200
# image's) and 0.12.0.1, but none of the changes since the last GPU run has run on a GPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PART=${1:-all}
case $PART in
  all|model|kernels|sweep|fuzz) ;;
  *) echo "gpu_check.sh: unknown part '$PART' (expected all, model, kernels, sweep or fuzz)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DEEPSEEK_JAX_COMPILE_CACHE=/tmp/jax_cache
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
quiet() { grep -v "^W\|^I"; }

if [[ $PART == all || $PART == model ]]; then
  echo "== model correctness (JAX on GPU, fp32 HIGHEST matmuls) =="
  tests="tests/test_attention.py"
  if python3 -c "import transformers.models.deepseek_v32" 2>/dev/null; then
    tests="$tests tests/test_hf_parity.py"
  else
    echo "transformers has no deepseek_v32 here: HF parity skipped"
  fi
  JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout 180 python3 -m pytest -q -x -p no:cacheprovider $tests 2>&1 | tee "$OUT/tests.log" | tail -15
  echo "== timing: attention block, sparse vs dense, bf16 =="
  timeout 120 python3 -m experiments.bench_attention --preset=small --dtype=bfloat16 --topk=2048 --repeats=5 \
    --seq_lens=4096,8192,16384,32768,65536 --max_dense_bytes=2e10 --out="$OUT/bench_attention_small.json" \
    2>&1 | quiet | tee "$OUT/bench_small.log"
  timeout 120 python3 -m experiments.bench_attention --preset=v32-671b --dtype=bfloat16 --topk=2048 --repeats=5 \
    --seq_lens=4096,8192,16384,32768 --max_dense_bytes=2e10 --out="$OUT/bench_attention_v32.json" \
    2>&1 | quiet | tee "$OUT/bench_v32.log"
fi

# Kernels: "kernels" times the defaults only (one tile config per kernel), "sweep" every config.
if [[ $PART == all || $PART == kernels ]]; then
  caps=(60 60 110 60)
  tiles=(--decode_configs=128:4 --decode_mla_configs=64:32:8:1 --configs=32:64:4:2 --index_configs=4:128:8:2
         --topk_configs=4096:8 --bwd_configs=32:32:8:2 --seq_lens=16384,65536)
elif [[ $PART == sweep ]]; then
  caps=(120 120 220 110)
  tiles=(--seq_lens=4096,16384,65536)
fi
if [[ $PART == all || $PART == kernels || $PART == sweep ]]; then
  echo "== decode indexer (B=64, S=128K, T=1) on the stacked cache vs the old path (layer slice) =="
  timeout ${caps[0]} python3 -m experiments.bench_kernels --parts=decode "${tiles[@]}" \
    --out="$OUT/bench_kernels_decode.json" 2>&1 | quiet | tee "$OUT/bench_kernels_decode.log"
  echo "== decode sparse MLA (H=128, k=2048) on the stacked cache vs the old path (XLA gather + prefill kernel) =="
  timeout ${caps[1]} python3 -m experiments.bench_kernels --parts=decode_mla "${tiles[@]}" \
    --out="$OUT/bench_kernels_decode_mla.json" 2>&1 | quiet | tee "$OUT/bench_kernels_decode_mla.log"
  echo "== DSA prefill kernels: check on the device, then time against the XLA reference and cuDNN dense =="
  timeout ${caps[2]} python3 -m experiments.bench_kernels --parts=sparse_mla,indexer "${tiles[@]}" \
    --out="$OUT/bench_kernels.json" 2>&1 | quiet | tee "$OUT/bench_kernels.log"
  echo "== sparse MLA backward: check against the reference VJP, then time (its own cap: a slow prefill part cannot cut it) =="
  timeout ${caps[3]} python3 -m experiments.bench_kernels --parts=backward "${tiles[@]}" \
    --out="$OUT/bench_kernels_backward.json" 2>&1 | quiet | tee "$OUT/bench_kernels_backward.log"
fi

if [[ $PART == fuzz ]]; then
  echo "== random cases: compiled Triton kernels vs their references =="
  timeout 180 python3 -m experiments.fuzz_kernels --fuzz_impls=triton --fuzz_cases=10 \
    --fuzz_out="$OUT/fuzz_kernels.json" 2>&1 | quiet | tee "$OUT/fuzz_kernels.log" | tail -40
fi
