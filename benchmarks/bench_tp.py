"""Tensor-parallel collectives: mpipipe's paths (TpGroup.all_reduce, and sequence parallelism's
all_gather / reduce_scatter, through the transport) against raw MPI of the same bytes.

On a tp communicator of `--ranks` ranks, times in the same run the all-reduce of one block
activation (micro-batch x seq x d_model float32, what each of a block's 4 all-reduces per
micro-batch moves) by (a) `TpGroup.all_reduce`: an in-place Iallreduce posted through the
transport and waited for with its polling back-off, and (b) a blocking `comm.Allreduce`
(MPI_IN_PLACE) of a buffer of the same size; with sequence parallelism, the all-gather of a
token block (B, T / tp, C) and the reduce-scatter of the whole activation to it, against
`comm.Allgather` / `comm.Reduce_scatter_block` of the same bytes (ours allocates its output
each call, as the layers need a new array, from a heap kept as a training rank keeps it:
`runtime.reuse_host_memory`; raw MPI reuses one buffer). Prints the times and the
ratios raw / mpipipe (1.0: no overhead); goal >= 0.8 (the back-off may add up to its 0.2 ms cap
to a short wait).

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
    from mpipipe.runtime import reuse_host_memory

    reuse_host_memory()  # as a training rank does: freed outputs are reused, not page-faulted
    comm = MPI.COMM_WORLD.Dup()
    group = TpGroup(comm, Transport(), args.spin_us * 1e-6)
    tp = comm.size
    shape = (args.micro_batch, args.seq_len, args.d_model)
    block = (args.micro_batch, args.seq_len // tp, args.d_model)  # my token block
    ours, raw = np.ones(shape, dtype=np.float32), np.ones(shape, dtype=np.float32)
    mine, gathered = np.ones(block, dtype=np.float32), np.empty(shape, dtype=np.float32)
    scattered = np.empty(block, dtype=np.float32)

    def all_reduce() -> None:
        group.all_reduce(ours)
        ours.fill(1.0)  # keep the values finite (both paths do the same work)

    def raw_all_reduce() -> None:
        comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        raw.fill(1.0)

    # sequence parallelism: the two halves of the all-reduce, on (B, T, C) cut into token blocks
    pairs = {
        "all-reduce": (raw_all_reduce, all_reduce),
        "all-gather (sp)": (
            lambda: comm.Allgather(mine, gathered),
            lambda: group.all_gather(mine),
        ),
        "reduce-scatter (sp)": (
            lambda: comm.Reduce_scatter_block(raw, scattered, op=MPI.SUM),
            lambda: group.reduce_scatter(ours),
        ),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats + 1):
        for what, (plain, path) in pairs.items():
            for name, fn in (("raw", plain), ("mpipipe", path)):  # alternate: same noise
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(args.inner_reps):
                    fn()
                dt = comm.allreduce((time.perf_counter() - t0) / args.inner_reps, op=MPI.MAX)
                if rep:  # the first round warms up
                    times.setdefault((what, name), []).append(dt)
    if comm.rank == 0:
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        mib = ours.nbytes / 2**20
        print(
            f"tp={tp}, one activation {shape} float32 ({mib:.2f} MiB; its token block "
            f"{block}), median of {args.repeats} x {args.inner_reps}"
        )
        print("| collective | path | ms | ratio raw / mpipipe |")
        print("|---|---|---|---|")
        for what in pairs:
            r, o = med[(what, "raw")], med[(what, "mpipipe")]
            print(f"| {what} | raw MPI | {r * 1e3:.3f} | |")
            print(f"| {what} | mpipipe | {o * 1e3:.3f} | {r / o:.3f} |")
        for what in pairs:
            ratio = med[(what, "raw")] / med[(what, "mpipipe")]
            print(f"summary: tensor parallel | tp {what} vs raw MPI | {ratio:.3f} | >= 0.8")
            print(
                f"mpipipe / raw {what} speed {ratio:.3f} (goal >= 0.8): "
                f"{'met' if ratio >= 0.8 else 'NOT met'}"
            )
        both = sum(med[(w, "mpipipe")] for w in pairs if w.endswith("(sp)"))
        print(
            f"sequence parallelism: all-gather + reduce-scatter {both * 1e3:.3f} ms vs one "
            f"all-reduce {med[('all-reduce', 'mpipipe')] * 1e3:.3f} ms (the same bytes)"
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
