"""Run the benchmarks and print one summary table (each benchmark's own tables follow).

    python benchmarks/run_all.py          # kernels, step, p2p: under 3 minutes on 2 cores
    python benchmarks/run_all.py --all    # also schedules, synthesizer, data parallel, checkpoints

Every ratio compares against a reference measured in the same run on the same machine, since
absolute times drift on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORE = ["bench_kernels.py", "bench_step.py", "bench_p2p.py", "bench_host_syncs.py"]
MORE = [
    "bench_schedules.py",
    "bench_synth.py",
    "bench_data_parallel.py",
    "bench_checkpoint.py",
    "bench_data.py",
    "bench_cores.py",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also the slower benchmarks")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    summaries, details, failed = [], [], []
    t0 = time.perf_counter()
    for name in CORE + (MORE if args.all else []):
        start = time.perf_counter()
        r = subprocess.run(
            [sys.executable, str(HERE / name)], cwd=HERE, env=env, capture_output=True, text=True
        )
        took = time.perf_counter() - start
        if r.returncode:
            failed.append(name)
        lines = r.stdout.splitlines()
        summaries += [ln[len("summary: ") :] for ln in lines if ln.startswith("summary: ")]
        details.append(
            f"## {name} ({took:.0f} s)\n"
            + "\n".join(ln for ln in lines if not ln.startswith("summary: "))
            + (r.stderr[-2000:] if r.returncode else "")
        )
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {time.perf_counter() - t0:.0f} s in all\n"
    )
    print("| benchmark | what | ratio | goal |")
    print("|---|---|---|---|")
    for s in summaries:
        print(f"| {s} |")
    print()
    print("\n\n".join(details))
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
