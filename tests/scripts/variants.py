"""Train a small GPT for 3 steps (float64) once per variant given as KEY=VALUE[,KEY=VALUE];
save losses, the peak saved-activation MiB per stage, and every parameter.

    mpiexec -n 2 python tests/scripts/variants.py OUT.npz recompute=none recompute=full
"""

import io
import sys

import numpy as np
from mpi4py import MPI

from mpipipe import TrainConfig, train

out, variants = sys.argv[1], sys.argv[2:]
comm = MPI.COMM_WORLD
arrays = {}
for v in variants:
    changes = dict(kv.split("=") for kv in v.split(","))
    cfg = TrainConfig(
        layers=4,
        d_model=32,
        heads=4,
        seq_len=32,
        global_batch=8,
        microbatches=4,
        steps=3,
        dtype="float64",
        eval_every=0,
        eval_batches=1,
        **changes,
    )
    result = train(cfg, comm=comm, out=io.StringIO())
    gathered = comm.gather(result.params, root=0)
    if comm.rank == 0:
        arrays[f"{v}/loss"] = np.array([r["loss"] for r in result.history])
        arrays[f"{v}/stash_mb"] = np.array(result.history[-1]["stash_mb"])
        for params in gathered:
            for name, value in params.items():
                arrays[f"{v}/{name}"] = value
if comm.rank == 0:
    np.savez(out, **arrays)
