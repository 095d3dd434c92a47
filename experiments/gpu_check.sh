#!/usr/bin/env bash
# One GPU check, run from the repo root on a machine with JAX (CUDA), flax, optax: installs
# nothing. Correctness first (our model on the GPU vs the CPU oracle, fp32 with exact matmuls),
# then timing (sparse vs dense attention block). Results land in ${OUT:-/tmp/gpu_check}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== correctness (JAX on GPU, fp32 HIGHEST matmuls) =="
export JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest DEEPSEEK_JAX_COMPILE_CACHE=/tmp/jax_cache
tests="tests/test_attention.py"
if python3 -c "import transformers.models.deepseek_v32" 2>/dev/null; then
  tests="$tests tests/test_hf_parity.py"
else
  echo "transformers has no deepseek_v32 here: HF parity skipped"
fi
timeout 180 python3 -m pytest -q -x -p no:cacheprovider $tests 2>&1 | tee "$OUT/tests.log" | tail -15
unset JAX_DEFAULT_MATMUL_PRECISION

echo "== timing: attention block, sparse vs dense, bf16 =="
timeout 120 python3 -m experiments.bench_attention --preset=small --dtype=bfloat16 --topk=2048 --repeats=5 \
  --seq_lens=4096,8192,16384,32768,65536 --max_dense_bytes=2e10 --out="$OUT/bench_attention_small.json" \
  2>&1 | grep -v "^W\|^I" | tee "$OUT/bench_small.log"
timeout 120 python3 -m experiments.bench_attention --preset=v32-671b --dtype=bfloat16 --topk=2048 --repeats=5 \
  --seq_lens=4096,8192,16384,32768 --max_dense_bytes=2e10 --out="$OUT/bench_attention_v32.json" \
  2>&1 | grep -v "^W\|^I" | tee "$OUT/bench_v32.log"
