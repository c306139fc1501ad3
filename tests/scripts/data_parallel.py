"""Train a small GPT for 3 steps (float64, SGD with momentum) with the given schedules on a
pp x dp grid and save the loss history and every parameter (gathered from replica 0).

    python tests/scripts/data_parallel.py OUT.npz PP 1f1b             # PP=1: the reference
    mpiexec -n 4 python tests/scripts/data_parallel.py OUT.npz 2 gpipe 1f1b   # pp=2 x dp=2
"""

import io
import sys

import numpy as np
from mpi4py import MPI

from mpipipe import TrainConfig, train

out, pp, schedules = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
comm = MPI.COMM_WORLD
arrays = {}
for name in schedules:
    cfg = TrainConfig(
        layers=4,
        d_model=32,
        heads=4,
        seq_len=16,
        global_batch=16,
        microbatches=2,
        steps=3,
        schedule=name,
        dtype="float64",
        pp=pp,
        optimizer="sgd",
        lr=0.05,
        eval_every=0,
        eval_batches=1,
        bucket_mb=0.01,
    )
    result = train(cfg, comm=comm, out=io.StringIO())
    gathered = comm.gather(result.params, root=0)
    if comm.rank == 0:
        arrays[f"{name}/loss"] = np.array([r["loss"] for r in result.history])
        arrays[f"{name}/eval"] = np.array(result.eval_losses)
        for params in gathered:
            for pname, value in params.items():
                arrays.setdefault(f"{name}/{pname}", value)  # replicas hold equal copies
if comm.rank == 0:
    np.savez(out, **arrays)
