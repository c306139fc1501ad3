"""Point-to-point transport: non-blocking Isend/Irecv of preallocated buffers, deterministic tags.

Waiting first spins on `Test` for `spin_s` (a message that is about to land costs no sleep:
a Linux sleep lasts 50-100 us at least), then polls with a back-off sleep instead of blocking in
MPI_Wait: MPICH busy-spins in a blocking wait, which on an oversubscribed node (more ranks than
cores) steals the cores that the computing ranks need. The back-off caps the added latency at
`max_sleep_s`.
"""

from __future__ import annotations

import time
from typing import Any

from mpi4py import MPI

from mpipipe.xp import Array

KINDS = {"A": 0, "G": 1}  # activation (forward), gradient (backward)


def tag(kind: str, mb: int, stage: int, n_stages: int, m: int) -> int:
    """Unique per (kind, micro-batch, receiving stage) within one step; < 2 * n_stages * m."""
    return (KINDS[kind] * n_stages + stage) * m + mb


def max_tag(n_stages: int, m: int) -> int:
    return 2 * n_stages * m - 1


class P2P:
    """Messages between pipeline neighbours on a private communicator."""

    def __init__(self, comm: MPI.Comm, max_sleep_s: float = 2e-4, spin_s: float = 5e-5) -> None:
        self.comm = comm
        self.max_sleep_s, self.spin_s = max_sleep_s, spin_s

    def isend(self, buf: Array, dest: int, tag: int) -> MPI.Request:
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def irecv(self, buf: Array, source: int, tag: int) -> MPI.Request:
        return self.comm.Irecv(buf, source=source, tag=tag)

    def wait(self, req: MPI.Request) -> None:
        if req.Test():
            return
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            if req.Test():
                return
        sleep = 1e-5
        while not req.Test():
            time.sleep(sleep)
            sleep = min(2 * sleep, self.max_sleep_s)

    def waitall(self, reqs: list[Any]) -> None:
        for r in reqs:
            self.wait(r)
