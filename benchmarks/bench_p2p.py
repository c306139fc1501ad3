"""Activation transfer between two pipeline ranks: the executor against raw Isend/Irecv.

Rank 0 runs stage 0 and rank 1 stage 1 of a forward-only plan whose compute is emulated at zero
cost, so each step is m activation messages of the given size through the executor (mailbox,
posted receives, polling waits). The reference sends the same m buffers between the same two
ranks with plain `Isend`/`Irecv` + `Wait`, in the same run. Latency: one micro-batch's round
trip (forward activation, backward gradient) of a 64-byte activation, executor vs raw
`Send`/`Recv` ping-pong.

    python benchmarks/bench_p2p.py [--sizes 4096,262144,4194304,33554432] [--m 8]
"""

from __future__ import annotations

import argparse
import time


def measure(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from mpipipe.emulate import EmulatedCompute
    from mpipipe.executor import Executor, MicroBatches
    from mpipipe.layers import GELU
    from mpipipe.model import LayerSpec, Model
    from mpipipe.parallel.transport import Transport, spin_for
    from mpipipe.schedule import Costs, forward_only, lower, one_f_one_b
    from mpipipe.stage import Compute, Stage

    comm = MPI.COMM_WORLD.Dup()
    rank = comm.Get_rank()
    p2p = Transport(spin_s=spin_for(comm.Get_size())).link(comm)  # as the runtime's, 1 node
    zero = Costs(0.0, 0.0, 0.0)

    def executor(floats: int, m: int, train: bool) -> tuple[Executor, MicroBatches]:
        model = Model(
            [LayerSpec("a", lambda init: GELU()), LayerSpec("b", lambda init: GELU())],
            act_shape=lambda i, b: (b, floats),
        )
        plan = one_f_one_b(2, m)
        compute = EmulatedCompute(Compute(0, np.float32, np), zero, 1)
        stage = Stage.of_rank(model, plan, rank, compute)
        row_plan = plan if train else forward_only(plan)
        ex = Executor(lower(row_plan), rank, stage, model, p2p, 1, np.float32, np)
        x = [np.zeros((1, floats), np.float32)] * m
        return ex, MicroBatches(x if rank == 0 else None, [None] * m if rank == 1 else None)

    def timed(fn, repeats: int) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        return best

    rows = []
    for size in map(int, args.sizes.split(",")):
        floats = size // 4
        ex, batch = executor(floats, args.m, train=False)
        send = np.ones(floats, np.float32)  # as the executor: one output buffer, re-sent
        recv = [np.empty(floats, np.float32) for _ in range(2)]  # its 2 pooled receive buffers

        def raw(send=send, recv=recv) -> None:  # noqa: ANN001 - bound per size
            m = args.m
            if rank == 0:
                MPI.Request.Waitall([comm.Isend(send, 1, tag=i) for i in range(m)])
                return
            reqs = [comm.Irecv(recv[i], 0, tag=i) for i in range(min(2, m))]
            for i in range(m):  # each receive posted two ahead, into the buffer just freed
                reqs[i].Wait()
                if i + 2 < m:
                    reqs.append(comm.Irecv(recv[i % 2], 0, tag=i + 2))

        t_ex = timed(lambda ex=ex, batch=batch: ex.run(batch), args.repeats)
        t_raw = timed(raw, args.repeats)
        rows.append((size, args.m * size / t_ex, args.m * size / t_raw))

    # latency: one micro-batch's round trip with 64-byte messages
    ex, _ = executor(16, 1, train=True)
    small = MicroBatches(
        [np.zeros((1, 16), np.float32)] if rank == 0 else None,
        [np.zeros((1,), np.int64)] if rank == 1 else None,
    )
    ex.stage.loss.dy = np.zeros((1, 16), np.float32)
    ping = np.zeros(16, np.float32)

    def pingpong() -> None:
        if rank == 0:
            comm.Send(ping, 1, tag=1)
            comm.Recv(ping, 1, tag=2)
        else:
            comm.Recv(ping, 0, tag=1)
            comm.Send(ping, 0, tag=2)

    lat_ex = timed(lambda: ex.run(small), args.repeats * 20)
    lat_raw = timed(pingpong, args.repeats * 20)
    if rank == 0:
        print(f"2 ranks, {args.m} messages per step, best of {args.repeats}")
        print("| message | executor MB/s | raw Isend/Irecv MB/s | ratio |")
        print("|---|---|---|---|")
        for size, bw_ex, bw_raw in rows:
            print(
                f"| {size / 1024:.0f} KiB | {bw_ex / 2**20:.0f} | {bw_raw / 2**20:.0f} | "
                f"{bw_ex / bw_raw:.2f} |"
            )
        print(
            f"| round trip, 64 B | {lat_ex * 1e6:.0f} us | {lat_raw * 1e6:.0f} us | "
            f"{lat_raw / lat_ex:.2f} |"
        )
        big = rows[-1]
        print(
            f"summary: p2p | executor vs raw bandwidth, {big[0] / 2**20:.0f} MiB messages | "
            f"{big[1] / big[2]:.2f} | (reference)"
        )
        print(
            f"summary: p2p | executor vs raw round trip, 64 B | {lat_raw / lat_ex:.2f} | "
            "(reference)"
        )
    p2p.transport.close()
    comm.Free()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,262144,4194304,33554432")
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        measure(args)
        return 0
    from _launch import relaunch

    return relaunch(2, __file__)


if __name__ == "__main__":
    raise SystemExit(main())
