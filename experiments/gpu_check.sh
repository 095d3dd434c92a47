#!/usr/bin/env bash
# One GPU check, run from the repo root on a machine with JAX (CUDA), flax, optax: installs
# nothing. Correctness first, then timing. Results land in ${OUT:-/tmp/gpu_check}.
#   bash experiments/gpu_check.sh            everything (more than one 10-minute device call: run the two parts apart)
#   bash experiments/gpu_check.sh model      model correctness (GPU vs the CPU oracle) + bench_attention
#   bash experiments/gpu_check.sh kernels    DSA kernels: device check vs the reference, then bench_kernels
#                                            (decode indexer, then decode attention, each in its own run capped at
#                                            120 s, then prefill + backward capped at 330 s: at most 9.5 minutes;
#                                            the prefill part took ~150 s before the indexer's key-loop sweep was added)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PART=${1:-all}
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

if [[ $PART == all || $PART == kernels ]]; then
  echo "== decode indexer (B=64, S=128K, T=1) on the stacked cache vs the old path (layer slice) =="
  timeout 120 python3 -m experiments.bench_kernels --parts=decode --out="$OUT/bench_kernels_decode.json" \
    2>&1 | quiet | tee "$OUT/bench_kernels_decode.log"
  echo "== decode sparse MLA (H=128, k=2048) on the stacked cache vs the old path (XLA gather + prefill kernel) =="
  timeout 120 python3 -m experiments.bench_kernels --parts=decode_mla --out="$OUT/bench_kernels_decode_mla.json" \
    2>&1 | quiet | tee "$OUT/bench_kernels_decode_mla.log"
  echo "== DSA kernels: check on the device, then time against the XLA reference and cuDNN dense =="
  timeout 330 python3 -m experiments.bench_kernels --parts=sparse_mla,indexer,backward --seq_lens=4096,16384,65536 \
    --out="$OUT/bench_kernels.json" 2>&1 | quiet | tee "$OUT/bench_kernels.log"
fi
