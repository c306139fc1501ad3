"""Shared helpers for benchmarks that launch mpipipe jobs: mpiexec lookup, run, read metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpipipe.study import find_mpiexec, train_command

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    found = find_mpiexec()
    if not found:
        sys.exit("no mpiexec: pip install -e '.[mpi]'")
    return found


def train(ranks: int, *flags: str, timeout: float = 600) -> list[dict]:
    """Run `mpipipe train` on `ranks` ranks; return its per-step metrics records."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        cmd = train_command([mpiexec(), "-n", str(ranks)], list(flags), metrics)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
