"""Gradient all-reduce bandwidth: mpipipe's bucketed path against one plain Allreduce.

Builds one pipeline stage of a GPT on every rank (pp=1, dp=ranks), then times, in the same run
and on the same buffers' total size: (a) the GradReducer path (buckets in backward order, each an
in-place Iallreduce started as its layers become final, then waited for), and (b) a single
`comm.Allreduce` of one flat buffer of the same total size, and (c) ZeRO-1's communication
(parallel/zero.py): the same buckets padded, reduce-scattered as they become final, then my
block all-gathered back into every parameter (the optimizer's arithmetic left out). A
reduce-scatter plus an all-gather move what one all-reduce moves, so (c) is held to the same
goal. Prints the bandwidths (bytes of gradient per second) and the ratios; goal: >= 0.9.

    python benchmarks/bench_data_parallel.py [--ranks 2] [--d-model 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import time


def measure(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from mpipipe.model import gpt
    from mpipipe.parallel.data_parallel import GradReducer
    from mpipipe.parallel.transport import Transport
    from mpipipe.parallel.zero import ZeroShards
    from mpipipe.schedule import one_f_one_b
    from mpipipe.stage import Compute, Stage

    comm = MPI.COMM_WORLD
    model = gpt(args.layers, args.d_model, max(1, args.d_model // 64), 128)
    stage = Stage.of_rank(model, one_f_one_b(1, 1), 0, Compute(0, np.float32, np))
    overlap = args.overlap == "on"
    reducer = GradReducer(stage, comm, Transport(), int(args.bucket_mb * 2**20), overlap)
    flat = np.ones(reducer.nbytes // 4, dtype=np.float32)
    # built last, so the stage's gradients are views into its (padded) buckets
    transport = Transport()
    sharded = GradReducer(stage, comm, transport, int(args.bucket_mb * 2**20), overlap, comm.size)
    zero = ZeroShards(stage, sharded, comm, transport)

    def zero1() -> None:
        for i in sorted(stage.layer_params, reverse=True):
            sharded.layer_ready(i)
        sharded.finish()
        zero.gather()

    def bucketed() -> None:
        for i in sorted(stage.layer_params, reverse=True):
            reducer.layer_ready(i)
        reducer.finish()

    def plain() -> None:
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)

    times: dict[str, list[float]] = {"bucketed": [], "plain": [], "zero-1": []}
    paths = (("plain", plain), ("bucketed", bucketed), ("zero-1", zero1))
    for rep in range(args.repeats + 1):
        for name, fn in paths:  # alternate: same noise
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if rep:  # the first round warms up
                times[name].append(dt)
    reducer.close()
    sharded.close()
    if comm.rank == 0:
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        mb = reducer.nbytes / 2**20
        print(
            f"{comm.size} ranks, {mb:.1f} MiB of float32 gradients, "
            f"{len(reducer.buckets)} buckets of <= {args.bucket_mb} MiB, median of "
            f"{args.repeats}"
        )
        print("| path | ms | GB/s (gradient bytes / time) | ratio |")
        print("|---|---|---|---|")
        for name in ("plain", "bucketed", "zero-1"):
            gbs = reducer.nbytes / med[name] / 1e9
            print(
                f"| {name} | {med[name] * 1e3:.2f} | {gbs:.2f} | {med['plain'] / med[name]:.3f} |"
            )
        ratio = med["plain"] / med["bucketed"]
        zratio = med["plain"] / med["zero-1"]
        print(
            f"summary: data parallel | bucketed vs plain all-reduce bandwidth | {ratio:.3f} | "
            ">= 0.9"
        )
        print(
            f"summary: data parallel | ZeRO-1 reduce-scatter + all-gather vs plain all-reduce "
            f"| {zratio:.3f} | >= 0.9"
        )
        print(
            f"bucketed / plain bandwidth {ratio:.3f} (goal >= 0.9): "
            f"{'met' if ratio >= 0.9 else 'NOT met'}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--overlap", default="on", choices=("on", "off"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        measure(args)
        return 0
    from _launch import relaunch

    return relaunch(args.ranks, __file__)


if __name__ == "__main__":
    raise SystemExit(main())
