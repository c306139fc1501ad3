"""Micro-benchmarks that `plan --calibrate` runs under mpiexec on 2 ranks: one JSON line of
p2p ping-pong times (small and large messages) and an all-reduce, from rank 0.

    mpiexec -n 2 python -m mpipipe.plan.bench
"""

from __future__ import annotations

import json
import time

import numpy as np
from mpi4py import MPI

SMALL, LARGE = 8, 4 << 20  # bytes


def pingpong(comm: MPI.Comm, nbytes: int, repeats: int) -> float:
    """Best one-way time of `nbytes` between ranks 0 and 1."""
    buf = np.zeros(nbytes, dtype=np.uint8)
    peer = 1 - comm.Get_rank()
    best = float("inf")
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        if comm.Get_rank() == 0:
            comm.Send(buf, peer)
            comm.Recv(buf, peer)
        else:
            comm.Recv(buf, peer)
            comm.Send(buf, peer)
        best = min(best, (time.perf_counter() - t0) / 2)
    return best


def allreduce(comm: MPI.Comm, nbytes: int, repeats: int) -> float:
    buf = np.ones(nbytes // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    comm = MPI.COMM_WORLD
    out = {
        "small_s": pingpong(comm, SMALL, 200),
        "large_s": pingpong(comm, LARGE, 20),
        "allreduce_s": allreduce(comm, LARGE, 20),
        "ranks": comm.Get_size(),
        "small_bytes": SMALL,
        "large_bytes": LARGE,
    }
    if comm.Get_rank() == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
