"""Micro-benchmarks that `plan --calibrate` runs under mpiexec on 2 ranks: one JSON line of
p2p ping-pong times (small and large messages), an all-reduce between idle ranks, and the
all-reduce as tensor parallelism meets it (`busy`), from rank 0.

    mpiexec -n 2 python -m mpipipe.plan.bench
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

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


BUSY_BYTES = 128 << 10  # a small model's activation (4 x 64 x 128 float32)
BUSY_SEGMENTS = (0.25e-3, 0.5e-3, 1e-3, 2e-3, 4e-3, 16e-3)  # seconds of compute between them


def busy(comm: MPI.Comm, nbytes: int, segment: float, seconds: float = 0.5) -> list[float]:
    """[compute, lost]: seconds of compute between collectives (about `segment` of matrix
    products, as measured: the ranks' mean) and seconds per collective that the ranks lose
    beyond it when each computes, then all-reduces `nbytes` through the runtime's transport
    (tensor parallelism's pattern): the mean iteration time less the mean compute. The loss
    holds the collective's transfer, MPI's first call after compute (cold caches), and the
    wait for the slower rank (jitter)."""
    from threadpoolctl import threadpool_limits

    from mpipipe.parallel.transport import Transport, spin_for

    with threadpool_limits(1, user_api="blas"):  # one rank per core, as validate runs them
        return _busy(comm, nbytes, segment, seconds, Transport(spin_s=spin_for(comm.Get_size())))


def _busy(
    comm: MPI.Comm, nbytes: int, segment: float, seconds: float, transport: Any
) -> list[float]:
    x = np.random.default_rng(comm.Get_rank()).normal(size=(256, 128)).astype(np.float32)
    w = np.ones((128, 128), np.float32)
    best = math.inf  # a product's time at the machine's best speed: a load spike while it is
    for _ in range(5):  # timed would size every segment short (one timing of 100 did, at load)
        t0 = time.perf_counter()
        for _ in range(20):
            x @ w
        best = min(best, (time.perf_counter() - t0) / 20)
    unit = comm.allreduce(best) / comm.Get_size()
    reps, n = max(1, round(segment / unit)), max(20, int(seconds / segment))
    buf = np.ones(nbytes // 4, dtype=np.float32)
    comm.Barrier()
    iterations, computes = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w
        t1 = time.perf_counter()
        transport.allreduce_now(comm, buf, MPI.SUM)
        iterations.append(time.perf_counter() - t0)
        computes.append(t1 - t0)
    skip = n // 10  # the first few: both ranks still arriving
    compute = comm.allreduce(float(np.mean(computes[skip:]))) / comm.Get_size()
    return [compute, float(np.mean(iterations[skip:])) - compute]


def main() -> None:
    comm = MPI.COMM_WORLD
    out = {
        "small_s": pingpong(comm, SMALL, 200),
        "large_s": pingpong(comm, LARGE, 20),
        "allreduce_s": allreduce(comm, LARGE, 20),
        "busy": [busy(comm, BUSY_BYTES, seg) for seg in BUSY_SEGMENTS],  # [compute, lost]
        "busy_bytes": BUSY_BYTES,
        "ranks": comm.Get_size(),
        "small_bytes": SMALL,
        "large_bytes": LARGE,
    }
    if comm.Get_rank() == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
