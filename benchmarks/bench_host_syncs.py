"""Host synchronisations per training step on a device backend, for growing layer and
micro-batch counts: the budget is what the design needs (the step's losses and its gradient
norms, one transfer each = 2), whatever the model's depth or the number of micro-batches.

A count, not a time, made on the strict fake CuPy of the tests (tests/fakegpu): it runs the same
code path as a GPU and counts every float(), .item(), blocking copy and stream or event
synchronisation (real CuPy keeps no such count).

    python benchmarks/bench_host_syncs.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _launch import ROOT

BUDGET = 2  # one transfer of the losses, one of the per-layer squared gradient norms


def main() -> int:
    path = f"{ROOT / 'tests' / 'fakegpu'}{os.pathsep}{ROOT}"
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    script = ROOT / "tests" / "scripts" / "device_syncs.py"
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:])
        return 1
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"host synchronisations per step on the strict fake CuPy (budget {BUDGET})")
    print("| layers | micro-batches | syncs/step | / budget |")
    print("|---|---|---|---|")
    for row in rows:
        n = row["host_syncs_per_step"]
        print(f"| {row['layers']} | {row['microbatches']} | {n:g} | {n / BUDGET:.2f} |")
    worst = max(row["host_syncs_per_step"] for row in rows) / BUDGET
    print(f"summary: bench_host_syncs | host syncs per step, worst of 2-8 layers x 2-8 "
          f"micro-batches, vs the budget of {BUDGET} | {worst:.2f} | 1.00")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
