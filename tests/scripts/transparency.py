"""Train a small GPT for 3 steps with the given schedules in float64 and float32 and save the
losses, every parameter, and the measured and predicted peak stash.

    python tests/scripts/transparency.py OUT.npz 1f1b               # the reference: 1 process
    mpiexec -n 4 python tests/scripts/transparency.py OUT.npz gpipe 1f1b interleaved zb-h1 zbv

NAME@M runs with M micro-batches instead of 4 (dualpipev needs M >= 2 x ranks); its arrays are
under NAME@M. `auto` is the synthesized schedule under --memory 1.5 micro-batches.
"""

import io
import sys

import numpy as np
from mpi4py import MPI

from mpipipe import TrainConfig, schedule, train
from mpipipe.schedule import synth

AUTO_MEMORY = 1.5

out, schedules = sys.argv[1], sys.argv[2:]
comm = MPI.COMM_WORLD
arrays = {}
for spec in schedules:
    name, _, m = spec.partition("@")
    microbatches = int(m or 4)
    for dtype in ("float64", "float32"):
        cfg = TrainConfig(
            layers=8,
            d_model=32,
            heads=4,
            seq_len=16,
            global_batch=8,
            microbatches=microbatches,
            steps=3,
            schedule=name,
            memory=AUTO_MEMORY if name == "auto" else None,
            dtype=dtype,
            eval_every=0,
            eval_batches=1,
            lr=1e-2,
        )
        result = train(cfg, comm=comm, out=io.StringIO())
        params = comm.gather(result.params, root=0)
        if comm.rank == 0:
            key = f"{spec}/{dtype}"
            arrays[f"{key}/loss"] = np.array([r["loss"] for r in result.history])
            arrays[f"{key}/eval"] = np.array(result.eval_losses)
            for stage_params in params:
                for pname, value in stage_params.items():
                    arrays[f"{key}/{pname}"] = value
    if comm.rank == 0:
        plan = result.plan  # auto: synthesized for the layers' measured costs at start
        assert plan is not None
        if name != "auto":
            assert plan.actions == schedule.build(name, comm.size, microbatches).actions
        else:
            assert synth.memory(schedule.check(plan)) <= AUTO_MEMORY
        arrays[f"peak/{spec}/measured"] = np.array(result.peak_stash)
        arrays[f"peak/{spec}/predicted"] = np.array(schedule.check(plan).peak_stash)
if comm.rank == 0:
    np.savez(out, **arrays)
