#!/usr/bin/env bash
# One GPU check, under 5 minutes on one H200 (a lent device machine): the GPU tests and a GPU
# benchmark, written as a short table to $OUT (or ./gpu_check/). Installs nothing heavy: the
# image has cupy, mpi4py, h5py and numpy; pytest comes from PyPI wheels if missing.
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q pytest pytest-timeout
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m mpipipe doctor | tee "$out/doctor.txt"
# 1. every layer on CuPy vs the float64 NumPy reference, and a full step
timeout 240 python3 -m pytest -q tests/test_gpu.py "tests/test_bf16.py" -k "cupy or gpu" 2>&1 |
  tee "$out/tests.txt"
# 2. two ranks sharing the GPU train as one rank does (fp32), if an mpiexec is around
if command -v mpiexec >/dev/null; then
  for n in 1 2; do
    timeout 120 mpiexec -n "$n" python3 -m mpipipe train --backend cupy --share-gpus yes \
      --layers 4 --d-model 256 --heads 4 --seq-len 256 --global-batch 16 --microbatches 4 \
      --steps 3 --eval-batches 1 --metrics-file "$out/ranks$n.jsonl" > "$out/ranks$n.log" 2>&1
  done
  python3 - "$out" <<'PY' | tee "$out/pipeline.txt"
import json, sys
runs = [[json.loads(l)["loss"] for l in open(f"{sys.argv[1]}/ranks{n}.jsonl")] for n in (1, 2)]
print("1 rank vs 2 ranks sharing the GPU, losses:", runs, "bitwise equal:", runs[0] == runs[1])
PY
fi
# 3. GPT step throughput and TFLOP/s against a large cuBLAS matmul, same run
timeout 180 python3 benchmarks/bench_gpu.py 2>&1 | tee "$out/bench.txt"
