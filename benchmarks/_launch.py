"""Shared helpers for benchmarks that launch mpipipe jobs: mpiexec and its environment, run,
read metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpipipe import launch
from mpipipe.errors import ConfigError
from mpipipe.study import train_command

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    try:
        return launch.find().mpiexec
    except ConfigError as e:
        sys.exit(f"{e}\n(for the MPICH wheel: pip install -e '.[mpi]')")


def env(**extra: str) -> dict[str, str]:
    """This environment with our source on PYTHONPATH and the settings the MPI library needs."""
    return launch.environment({**os.environ, "PYTHONPATH": str(ROOT), **extra})


def relaunch(ranks: int, script: str) -> int:
    """Run `script` again on `ranks` ranks with --inner (its measuring part) and this command
    line's arguments, one BLAS thread per rank; its exit status."""
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, script, "--inner", *sys.argv[1:]]
    return subprocess.call(cmd, env=env(OMP_NUM_THREADS="1"))


REALTIME = ["chrt", "--rr", "10"]  # real-time round-robin priority 10 (root or CAP_SYS_NICE)


def bind_to_cores() -> list[str]:
    """The launcher's flag that pins each rank to a core (round robin when ranks outnumber the
    cores), as cluster launchers do (srun --cpu-bind=cores): MPICH's Hydra `-bind-to core`, Open
    MPI's `--bind-to core:overload-allowed` (it refuses more ranks than cores otherwise)."""
    if launch.family(launch.library_version()) == launch.OPEN_MPI:
        return ["--bind-to", "core:overload-allowed"]
    return ["-bind-to", "core"]


def train(
    ranks: int, *flags: str, timeout: float = 600, realtime: bool = False, bind: bool = False
) -> list[dict]:
    """Run `mpipipe train` on `ranks` ranks; return its per-step metrics records. `realtime`:
    under REALTIME, so that other users' processes on a shared machine cannot delay a rank that
    wakes (it then runs as soon as a core is free); the ranks sleep or back off when idle, so
    they do not starve the machine. `bind`: each rank pinned to a core (bind_to_cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        pin = bind_to_cores() if bind else []
        launcher = [*(REALTIME if realtime else []), mpiexec(), *pin, "-n", str(ranks)]
        cmd = train_command(launcher, list(flags), metrics)
        r = subprocess.run(
            cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
        )
        if r.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
