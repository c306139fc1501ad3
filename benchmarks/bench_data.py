"""Resident memory of ranks training on a token file much larger than what they read.

Writes a sparse 2 GiB uint16 token file (vocabulary 256; random ids in 64 MiB at each end and
in the middle, zeros elsewhere, made in a second) with its sidecar in /tmp, trains the default
GPT on it on 4 ranks (pp 2 x dp 2, so every rank holds a first or last stage and reads data),
and prints each rank's resident memory growth: peak RSS over the run (ru_maxrss) minus the RSS
just before train() (/proc/self/status), against the file's size. The same run on a 16 MiB
file first gives what the runtime itself grows by (model, buffers, MPI), so the difference is
what the data costs. The files are deleted after. Goal: well under 1 (each rank reads only its
replica's windows, memory-mapped).

    python benchmarks/bench_data.py [--gib 2] [--steps 20] [--ranks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 2**20


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_file(path: Path, gib: float) -> int:
    size = int(gib * 2**30) // 2 * 2
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.truncate(size)  # a hole: zeros (token 0) that take no disk
        part = min(32 * MIB, size // 8)  # tokens: 64 MiB at each place (less for small files)
        for at in (0, size // 2, size - 2 * part):
            fh.seek(at)
            fh.write(rng.integers(0, 256, part, dtype=np.uint16).tobytes())
    path.with_name(path.name + ".json").write_text(json.dumps({"dtype": "uint16", "vocab": 256}))
    return size


def inner(args: argparse.Namespace) -> None:
    import resource

    from mpi4py import MPI

    from mpipipe import TrainConfig, train

    comm = MPI.COMM_WORLD
    cfg = TrainConfig(
        data=args.file, pp=2, steps=args.steps, log_every=args.steps, eval_every=0,
        eval_batches=1, timeout_s=0,
    )  # fmt: skip
    before = rss_mb()
    train(cfg, comm=comm, out=open(os.devnull, "w"))  # noqa: SIM115 - quiet, closed at exit
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = comm.gather((comm.Get_rank(), before, peak, rss_mb()), root=0)
    if rows is not None:
        size_mb = os.path.getsize(args.file) / MIB
        print(f"token file {size_mb:.0f} MiB, {args.steps} steps, pp 2 x dp {comm.size // 2}")
        print("| rank | RSS before train (MiB) | peak RSS (MiB) | growth (MiB) | growth / file |")
        print("|---|---|---|---|---|")
        worst = 0.0
        for rank, b, p, _ in rows:
            worst = max(worst, (p - b) / size_mb)
            print(f"| {rank} | {b:.0f} | {p:.0f} | {p - b:.0f} | {(p - b) / size_mb:.3f} |")
        if args.reference:
            return
        print(
            f"summary: data | peak RSS growth per rank / token file size, worst of "
            f"{comm.size} ranks, {size_mb / 1024:.0f} GiB file | {worst:.3f} | <= 0.10"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        inner(args)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _launch import env, mpiexec

    status = 0
    for gib in (1 / 64, args.gib):  # the reference, then the large file
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            path = Path(tmp) / "tokens.bin"
            make_file(path, gib)
            cmd = [mpiexec(), "-n", str(args.ranks), sys.executable, __file__, "--inner",
                   "--file", str(path), "--steps", str(args.steps)]  # fmt: skip
            cmd += ["--reference"] if gib < args.gib else []
            status |= subprocess.call(cmd, env=env(OMP_NUM_THREADS="1"))
    return status


if __name__ == "__main__":
    sys.exit(main())
