"""Train a small GPT for 3 steps (float64, SGD with momentum) in each given layout on the ranks
this was launched on, and save every layout's losses and parameters (gathered from replica 0,
whole: tp shards are joined), under `bytes/LAYOUT` the parameter bytes of its fullest rank and
under `act/LAYOUT` the most bytes one micro-batch's forward saved on a rank (measured), under
`time/LAYOUT` its wall seconds (what each layout adds to a test).
A layout is a comma-separated list of TrainConfig overrides; its text is the key prefix.

    python tests/scripts/data_parallel.py OUT.npz pp=1                       # the reference
    mpiexec -n 4 python tests/scripts/data_parallel.py OUT.npz pp=2,schedule=gpipe pp=2
    mpiexec -n 16 python tests/scripts/data_parallel.py OUT.npz \\
        layers=16,pp=8,microbatches=8,schedule=zbv,rank_order=pp
    mpiexec -n 8 python tests/scripts/data_parallel.py OUT.npz pp=2,tp=2,dp=2,schedule=zbv
"""

import dataclasses
import io
import sys
import time

import numpy as np
from mpi4py import MPI

from mpipipe import TrainConfig, train

out, layouts = sys.argv[1], sys.argv[2:]
comm = MPI.COMM_WORLD
arrays = {}
for layout in layouts:
    overrides = dict(kv.split("=") for kv in layout.split(","))
    base = TrainConfig(
        layers=4,
        d_model=32,
        heads=4,
        seq_len=16,
        global_batch=16,
        microbatches=2,
        steps=3,
        dtype="float64",
        optimizer="sgd",
        lr=0.05,
        eval_every=0,
        eval_batches=1,
        bucket_mb=0.01,
    )
    cfg = dataclasses.replace(
        base, **{k: int(v) if v.isdigit() else v for k, v in overrides.items()}
    )
    t0 = time.perf_counter()
    result = train(cfg, comm=comm, out=io.StringIO())
    seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    gathered = comm.gather(result.params, root=0)
    most = comm.allreduce(result.param_bytes, op=MPI.MAX)  # parameter bytes of the fullest rank
    act = comm.allreduce(result.activation_bytes, op=MPI.MAX)  # and saved activations
    if comm.rank == 0:
        arrays[f"bytes/{layout}"] = np.array(most)
        arrays[f"act/{layout}"] = np.array(act)
        arrays[f"time/{layout}"] = np.array(seconds)
        arrays[f"{layout}/loss"] = np.array([r["loss"] for r in result.history])
        arrays[f"{layout}/eval"] = np.array(result.eval_losses)
        for params in gathered:
            for pname, value in params.items():
                arrays.setdefault(f"{layout}/{pname}", value)  # replicas hold equal copies
if comm.rank == 0:
    np.savez(out, **arrays)
