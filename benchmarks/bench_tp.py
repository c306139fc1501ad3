"""Tensor-parallel all-reduce: mpipipe's path (TpGroup.all_reduce, through the transport) against
a raw `comm.Allreduce` of the same bytes.

On a tp communicator of `--ranks` ranks, times in the same run the all-reduce of one block
activation (micro-batch x seq x d_model float32, what each of a block's 4 all-reduces per
micro-batch moves) by (a) `TpGroup.all_reduce`: an in-place Iallreduce posted through the
transport and waited for with its polling back-off, and (b) a blocking `comm.Allreduce`
(MPI_IN_PLACE) of a buffer of the same size. Prints both times and the ratio raw / mpipipe
(1.0: no overhead); goal >= 0.8 (the back-off may add up to its 0.2 ms cap to a short wait).

    python benchmarks/bench_tp.py [--ranks 2] [--micro-batch 4] [--seq-len 1024] [--d-model 768]
"""

from __future__ import annotations

import argparse
import time


def measure(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from mpipipe.parallel.tensor import TpGroup
    from mpipipe.parallel.transport import Transport

    comm = MPI.COMM_WORLD.Dup()
    group = TpGroup(comm, Transport(), args.spin_us * 1e-6)
    shape = (args.micro_batch, args.seq_len, args.d_model)
    ours, raw = np.ones(shape, dtype=np.float32), np.ones(shape, dtype=np.float32)

    def mpipipe_path() -> None:
        group.all_reduce(ours)

    def plain() -> None:
        comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)

    times: dict[str, list[float]] = {"raw": [], "mpipipe": []}
    for rep in range(args.repeats + 1):
        for name, fn in (("raw", plain), ("mpipipe", mpipipe_path)):  # alternate: same noise
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.inner_reps):
                fn()
                ours.fill(1.0)  # keep the values finite (both paths do the same work)
                raw.fill(1.0)
            dt = comm.allreduce((time.perf_counter() - t0) / args.inner_reps, op=MPI.MAX)
            if rep:  # the first round warms up
                times[name].append(dt)
    if comm.rank == 0:
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        mib = ours.nbytes / 2**20
        print(
            f"tp={comm.size}, one activation {shape} float32 ({mib:.2f} MiB) per all-reduce, "
            f"median of {args.repeats} x {args.inner_reps}"
        )
        print("| path | ms | GB/s (bytes / time) | ratio raw / path |")
        print("|---|---|---|---|")
        for name in ("raw", "mpipipe"):
            gbs = ours.nbytes / med[name] / 1e9
            print(f"| {name} | {med[name] * 1e3:.3f} | {gbs:.2f} | {med['raw'] / med[name]:.3f} |")
        ratio = med["raw"] / med["mpipipe"]
        print(
            f"summary: tensor parallel | tp all-reduce vs raw MPI Allreduce | {ratio:.3f} | >= 0.8"
        )
        print(
            f"mpipipe / raw all-reduce speed {ratio:.3f} (goal >= 0.8): "
            f"{'met' if ratio >= 0.8 else 'NOT met'}"
        )
    comm.Free()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner-reps", type=int, default=5)
    p.add_argument(
        "--spin-us",
        type=float,
        default=1000.0,
        help="spin before backing off (the runtime: 1000 with a core per rank, else 50)",
    )
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        measure(args)
        return 0
    from _launch import relaunch

    return relaunch(args.ranks, __file__)


if __name__ == "__main__":
    raise SystemExit(main())
