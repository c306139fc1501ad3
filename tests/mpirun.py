"""Launch real MPI jobs from pytest, with a hard timeout that kills every rank.

`mpiexec` is the one of the MPI library that this interpreter's mpi4py loads, started with the
settings that MPI needs here (mpipipe/launch.py). Each job runs in its own process group, so a
timeout kills the launcher and all ranks, and the test fails with the output so far instead of
freezing CI. Tests that use this module are marked `mpi` (tests/conftest.py): CI runs them under
a second MPI too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from mpipipe import launch
from mpipipe.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# a model and batch small enough for many launches; later flags on a command line win
TINY = (
    "--layers 4 --d-model 32 --heads 2 --seq-len 16 --global-batch 8 --microbatches 4 "
    "--eval-batches 1"
).split()

# mpiexec launches so far; tests/conftest.py fails a test that launched but is not marked `mpi`
launches = 0


def launcher() -> launch.Launcher:
    global launches
    launches += 1
    try:
        return launch.find()
    except ConfigError as e:
        pytest.fail(f"{e}\n(for the MPICH wheel: pip install -e '.[mpi,test]')")


def mpiexec() -> str:
    return launcher().mpiexec


def env(**extra: str) -> dict[str, str]:
    e = launch.environment()
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    e.update(extra)
    return e


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def program_stderr(self) -> str:
        """stderr without the launcher's own notice: Open MPI's mpirun adds a block between
        lines of dashes when a rank exits non-zero ("Primary job terminated normally, ...")."""
        kept, inside = [], False
        for line in self.stderr.splitlines(keepends=True):
            if line.startswith("-" * 20):
                inside = not inside
            elif not inside:
                kept.append(line)
        return "".join(kept)


def python() -> list[str]:
    return [sys.executable]


def run(
    args: list[str],
    n: int | None = None,
    timeout: float = 120.0,
    stdout: int | IO[str] = subprocess.PIPE,
    **extra_env: str,
) -> Result:
    """Run `python ARGS` on `n` ranks through mpiexec (n=None: a plain single process). Standard
    output is captured in Result.stdout unless `stdout` (a file, a terminal) takes it. A script
    (ARGS[0] ends in .py) runs under mpi4py's runner (`python -m mpi4py SCRIPT`): an exception
    on one rank aborts every rank, so a crash fails in seconds with its traceback instead of
    leaving the other ranks waiting until the timeout."""
    cmd = [sys.executable, *args]
    if n is not None:
        runner = ["-m", "mpi4py"] if args and args[0].endswith(".py") else []
        cmd = [*launcher().command(n), sys.executable, *runner, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(**extra_env),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout:.0f} s (hang?): {' '.join(cmd)}\n"
            f"--- stdout ---\n{(out or '')[-3000:]}\n--- stderr ---\n{err[-3000:]}"
        )
    return Result(proc.returncode, out or "", err, time.perf_counter() - t0)


def train(
    n: int | None,
    *flags: str,
    timeout: float = 120.0,
    stdout: int | IO[str] = subprocess.PIPE,
    **extra_env: str,
) -> Result:
    return run(["-m", "mpipipe", "train", *flags], n, timeout, stdout, **extra_env)


def layouts(path: Path, specs: list[str], ranks: int) -> dict[str, Any]:
    """Train every layout in `specs` (comma-separated TrainConfig overrides) in ONE launch of
    tests/scripts/data_parallel.py on `ranks` ranks; its arrays (losses, gathered parameters)
    under `LAYOUT/NAME`."""
    import numpy as np

    r = run(
        ["tests/scripts/data_parallel.py", str(path), *specs],
        n=None if ranks == 1 else ranks,
        timeout=240,
    )
    assert r.returncode == 0, r.output
    return dict(np.load(path))


def selected(request: pytest.FixtureRequest, argname: str, tests: set[str]) -> set[Any] | None:
    """The values of `argname` that the selected tests of the requesting fixture's module take,
    so that a module fixture launches only the runs those tests read (CI's Open MPI pass selects
    a few parametrizations with `-m openmpi`). `tests`: the test functions that read only the
    runs their `argname` names. None, meaning every run, when another test of the module is
    selected (it may read any run)."""
    values = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "originalname", None) not in tests or argname not in params:
            return None
        values.add(params[argname])
    return values
