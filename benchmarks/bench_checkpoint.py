"""Checkpoint save and load throughput against numpy.save / numpy.load of the same arrays.

One process builds a GPT stage with AdamW state (parameters + 2 slots), then, in the same run
and on the same disk: (a) `checkpoint.save` (HDF5 shard with fletcher32 per chunk, sha256 of the
file, manifest, one-file view, fsync, rename, `latest`) and `checkpoint.load` (sha256 check, read
into the live arrays); (b) `numpy.save` of every array to its own file, each fsynced, and
`numpy.load` of each. Loads are timed twice: "cold", after evicting the files from the page cache
(posix_fadvise DONTNEED), as a new job on a new allocation reads them, and "warm", from the page
cache, which isolates the software path (there numpy.load is a bare memcpy, while mpipipe checks
a fletcher32 sum over every chunk it reads). Goal: save and load each >= 0.8 of numpy.

    python benchmarks/bench_checkpoint.py [--d-model 768] [--layers 8] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = p.parse_args()

    import numpy as np
    from mpi4py import MPI

    from mpipipe import checkpoint
    from mpipipe.config import TrainConfig
    from mpipipe.job import prepare
    from mpipipe.optim import AdamW
    from mpipipe.parallel.grid import Grid
    from mpipipe.stage import Compute, Stage

    cfg = TrainConfig(layers=args.layers, d_model=args.d_model, heads=args.d_model // 64)
    job = prepare(cfg, 1)
    grid = Grid.create(MPI.COMM_WORLD, 1)
    stage = Stage.of_rank(job.model, job.plan, 0, Compute(0, np.float32, np))
    opt = AdamW(stage.params)
    for g in stage.grads.values():
        g[...] = 1e-3
    opt.step(stage.grads, 1e-3)
    arrays = list(stage.params.values()) + list(opt.m.values()) + list(opt.v.values())
    nbytes = sum(a.nbytes for a in arrays)
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_ckpt_"))
    ops = ("save", "load", "load warm", "np.save", "np.load", "np.load warm")
    times: dict[str, list[float]] = {k: [] for k in ops}

    def evict(folder: Path) -> None:
        for f in folder.iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    try:
        for rep in range(args.repeats):
            ck = base / f"ck{rep}"
            t0 = time.perf_counter()
            step_dir = checkpoint.save(ck, 1, stage, opt, job, grid)
            times["save"].append(time.perf_counter() - t0)
            for label in ("load", "load warm"):
                if label == "load":
                    evict(step_dir)
                t0 = time.perf_counter()
                checkpoint.load(step_dir, stage, opt, job.model)
                times[label].append(time.perf_counter() - t0)

            ref = base / f"np{rep}"
            ref.mkdir()
            t0 = time.perf_counter()
            for i, a in enumerate(arrays):
                path = ref / f"{i}.npy"
                with open(path, "wb") as fh:
                    np.save(fh, a)
                    fh.flush()
                    os.fsync(fh.fileno())
            fd = os.open(ref, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            times["np.save"].append(time.perf_counter() - t0)
            for label in ("np.load", "np.load warm"):
                if label == "np.load":
                    evict(ref)
                t0 = time.perf_counter()
                for i, a in enumerate(arrays):
                    a[...] = np.load(ref / f"{i}.npy")
                times[label].append(time.perf_counter() - t0)
            shutil.rmtree(ck)
            shutil.rmtree(ref)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        grid.free()
    best = {k: min(v) for k, v in times.items()}
    mb = nbytes / 2**20
    print(
        f"GPT {args.layers}x{args.d_model}: {len(arrays)} arrays, {mb:.0f} MiB "
        f"(parameters + AdamW m, v), best of {args.repeats}"
    )
    print("| operation | mpipipe MB/s | numpy MB/s | ratio |")
    print("|---|---|---|---|")
    ok = True
    for op in ("save", "load", "load warm"):
        ref_op = "np." + op
        ratio = best[ref_op] / best[op]
        ok &= ratio >= 0.8 or op == "load warm"
        label = {"load": "load (cold cache)", "load warm": "load (warm cache)"}.get(op, op)
        print(f"| {label} | {mb / best[op]:.0f} | {mb / best[ref_op]:.0f} | {ratio:.2f} |")
    print(f"goal: save and cold load >= 0.8 of numpy: {'met' if ok else 'NOT met'}")
    for op in ("save", "load"):
        ratio = best["np." + op] / best[op]
        cold = " (cold cache)" if op == "load" else ""
        print(f"summary: checkpoint | {op} vs numpy.{op}{cold} | {ratio:.2f} | >= 0.8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
