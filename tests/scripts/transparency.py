"""Train a small GPT for 3 steps with every (schedule, dtype) and save losses and parameters.

Run as a plain process (pp=1, the reference) or under `mpiexec -n P` (P stages); rank 0 gathers
every stage's parameters and writes OUT.npz.
"""

import io
import sys

import numpy as np
from mpi4py import MPI

from mpipipe import TrainConfig, train

out = sys.argv[1]
comm = MPI.COMM_WORLD
arrays = {}
for schedule in ("gpipe", "1f1b"):
    for dtype in ("float64", "float32"):
        cfg = TrainConfig(
            layers=4,
            d_model=32,
            heads=4,
            seq_len=16,
            global_batch=8,
            microbatches=4,
            steps=3,
            schedule=schedule,
            dtype=dtype,
            eval_every=0,
            eval_batches=1,
            lr=1e-2,
        )
        result = train(cfg, comm=comm, out=io.StringIO())
        params = comm.gather(result.params, root=0)
        if comm.rank == 0:
            key = f"{schedule}/{dtype}"
            arrays[f"{key}/loss"] = np.array([r["loss"] for r in result.history])
            arrays[f"{key}/eval"] = np.array(result.eval_losses)
            for stage_params in params:
                for name, value in stage_params.items():
                    arrays[f"{key}/{name}"] = value
if comm.rank == 0:
    np.savez(out, **arrays)
