#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes on one H200: every GPU-path check of the fake-device
# tests once on the real GPU, then the speed figures; one table (OUT/table.md), the same as JSON
# (OUT/results.json) and every command's output (OUT/log.txt).
#   bash scripts/gpu_check.sh [OUT_DIR]              on a GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --rehearse     on CPUs, under the fake CuPy (small shapes)
# Installs nothing heavy and fetches nothing: the image brings cupy, numpy, h5py, ml_dtypes and
# pytest. MPI comes as wheels in .whl/ (gitignored; carried along), fetched beforehand on a
# machine with PyPI by:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl \
#     mpich==5.0.2 mpi4py==4.1.2 pytest-timeout==2.4.0
# The mpich wheel's MPI is not CUDA-aware: two ranks share the GPU through pinned host buffers.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
shift || true
mkdir -p "$out"
py=python3
if [ "${1:-}" != --rehearse ] && compgen -G ".whl/*.whl" >/dev/null; then
  venv=/tmp/mpipipe-gpu-venv
  python3 -m venv --system-site-packages "$venv" &&
    "$venv/bin/pip" install -q --no-index --no-deps --no-compile .whl/*.whl &&
    py="$venv/bin/python" && export PATH="$venv/bin:$PATH"
fi
command -v mpiexec >/dev/null || echo "warning: no mpiexec: the 2-rank checks will fail" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 470 "$py" scripts/gpu_check.py "$out" "$@"
