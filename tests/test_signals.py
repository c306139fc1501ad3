"""Signals on real 2-rank MPICH jobs: SIGINT to the launcher stops like SIGTERM (the step
finishes, the job saves, exit 0), a second SIGINT aborts at once with 130 even while ranks wait
inside MPI, a signal before step 1 stops with a message."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests import mpirun
from tests.background import Job

TINY = mpirun.TINY
# These launch through tests/background.py (a job that runs while the test signals it), which the
# automatic `mpi` marking cannot see; they are marked here. `mpich_launcher`: what a SIGINT to the
# launcher does is the launcher's (MPICH's mpiexec forwards the first one to the ranks), so CI's
# Open MPI pass leaves them out; SIGTERM/SIGUSR1 to a rank are tested under both MPIs
# (tests/test_checkpoint.py).
pytestmark = [pytest.mark.mpi, pytest.mark.mpich_launcher]


def test_sigint_to_the_launcher_finishes_the_step_saves_and_exits_zero(tmp_path):
    """Ctrl-C at a terminal reaches the launcher; MPICH's forwards the first one to every rank
    (the ranks run in sessions of their own: the terminal does not reach them)."""
    d = tmp_path / "ck"
    job = Job(2, [*TINY, "--steps", "100000", "--checkpoint-dir", str(d)], tmp_path)
    job.wait_for(r"step +1/")
    job.proc.send_signal(signal.SIGINT)
    assert job.finish() == 0, job.output()
    out = job.output()
    assert "stopped by SIGINT after step" in out and "KeyboardInterrupt" not in out, out
    step = int((d / "latest").read_text().strip().split("_")[1])
    assert 0 < step < 100000 and f"checkpoint at step {step}" in out


def test_a_second_sigint_aborts_at_once_with_130(tmp_path):
    """Rank 1 hangs at step 3 (--inject-fault stall) and rank 0 waits for it inside MPI, where
    no Python handler runs; two SIGINTs to rank 0 end the job with 130 within seconds."""
    flags = [*TINY, "--steps", "50", "--checkpoint-dir", str(tmp_path / "ck")]
    job = Job(2, [*flags, "--inject-fault", "stall@1:2"], tmp_path)
    rank0 = job.pids()[0]
    job.wait_for(r"step +1/")  # rank 1 stalls at the start of step 3, a few ms later
    time.sleep(1.0)  # rank 0 now waits inside MPI for rank 1's activations
    os.kill(rank0, signal.SIGINT)
    job.wait_for("a second one aborts")
    t0 = time.perf_counter()
    os.kill(rank0, signal.SIGINT)
    assert job.finish(timeout=30) == 130, job.output()
    assert time.perf_counter() - t0 < 10
    assert "second SIGINT: aborting now" in job.output() and "Traceback" not in job.output()


def test_a_signal_before_the_first_step_stops_with_a_message(tmp_path):
    """SIGTERM sent while the ranks start up (held pending until the run's handlers are in
    place): no step runs, the message says so, exit 75 (nothing was lost: requeue and resume)."""
    d = tmp_path / "ck"
    flags = [*TINY, "--steps", "50", "--checkpoint-dir", str(d)]
    job = Job(2, flags, tmp_path, block={signal.SIGTERM})
    os.kill(job.pids()[1], signal.SIGTERM)
    assert job.finish() == 75, job.output()
    out = job.output()
    assert "stopped by SIGTERM before step 1: nothing trained, none saved" in out, out
    assert "step 1/" not in out and not list(d.glob("step_*"))
