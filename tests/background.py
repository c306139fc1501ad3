"""A training job left running under mpiexec, to be signalled: its output goes to files that
the test polls, so it can act at a known point (after step 1 was logged), not after a sleep
that a loaded machine may outlast."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import mpirun


class Job:
    def __init__(
        self,
        ranks: int,
        flags: list[str],
        out: Path,
        block: set[int] | None = None,
        **env: str,
    ) -> None:
        """`block`: signals blocked in the launcher and its ranks from the start; they stay
        pending until the run's handlers unblock them (a signal "during start-up")."""

        def pre() -> None:
            if block:
                signal.pthread_sigmask(signal.SIG_BLOCK, block)

        out.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = out / "stdout", out / "stderr"
        self.marker = str(out)  # on every rank's command line (pass it in a flag)
        cmd = [mpirun.mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpipipe", "train"]
        with open(self.stdout, "w") as o, open(self.stderr, "w") as e:
            self.proc = subprocess.Popen(
                [*cmd, *flags],
                cwd=mpirun.ROOT,
                env=mpirun.env(**env),
                stdout=o,
                stderr=e,
                start_new_session=True,
                preexec_fn=pre,
            )
        self.ranks = ranks

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        """Until stdout matches the regular expression (e.g. r"step +1/": step 1 logged)."""
        deadline = time.time() + timeout
        while not re.search(pattern, self.stdout.read_text()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise AssertionError(f"never printed {pattern!r}:\n{self.output()}")
            time.sleep(0.1)

    def pids(self, timeout: float = 60) -> list[int]:
        """The ranks' process ids, rank 0 first (the marker must not contain "mpiexec")."""
        deadline = time.time() + timeout
        while len(found := _ranks_of(self.marker)) < self.ranks and time.time() < deadline:
            time.sleep(0.1)
        assert len(found) == self.ranks, (found, self.output())
        return found

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _ranks_of(marker: str) -> list[int]:
    """Process ids in rank order, from the rank that MPICH's (PMI_RANK) or Open MPI's
    (OMPI_COMM_WORLD_RANK) launcher put in each rank's environment: the order of process ids is
    not the order of ranks."""
    ranked = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = dict(
                    kv.split(b"=", 1)
                    for kv in (p / "environ").read_bytes().split(b"\0")
                    if b"=" in kv
                )
            except OSError:
                continue
            rank = env.get(b"PMI_RANK", env.get(b"OMPI_COMM_WORLD_RANK"))
            if marker in cmd and "python" in cmd and "mpiexec" not in cmd and rank is not None:
                ranked.append((int(rank), int(p.name)))
    return [pid for _, pid in sorted(ranked)]
