"""Saving: every pipeline rank's shard, then rank 0's manifest and one-file view, renamed into
place atomically; a failure on any rank removes the partial save and raises SaveError on all."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpipipe.checkpoint.base import (
    MAGIC,
    VERSION,
    SaveError,
    dataset_path,
    groups,
    slot_path,
    step_name,
)
from mpipipe.checkpoint.files import digest, fsync, h5_write, io_error, sha256
from mpipipe.checkpoint.find import prune
from mpipipe.errors import ConfigError
from mpipipe.faults import Faults
from mpipipe.parallel.tensor import whole
from mpipipe.xp import storable

Shard = dict[str, Any]  # a shard's manifest entry


def write_shard(path: Path, tensors: dict[str, Any], attrs: dict[str, Any]) -> tuple[str, int]:
    """Write {dataset path: array}, each dataset carrying the sha256 of its bytes, with
    checksummed metadata (the 1.8+ object formats, still readable by HDF5 1.10 tools); fsync
    while hashing the file (for the manifest); return (file sha256, bytes). Raises OSError.

    The datasets' digests are computed on a thread pool while h5py writes (hashlib releases the
    GIL), so checksumming costs little wall time."""
    arrays = {name: np.ascontiguousarray(storable(v)) for name, v in tensors.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        digests = {name: pool.submit(sha256, a) for name, a in arrays.items()}

        def fill(f: h5py.File) -> None:
            f.attrs["magic"] = MAGIC
            f.attrs["version"] = VERSION
            for k, v in attrs.items():
                f.attrs[k] = v
            for name, a in arrays.items():
                f.create_dataset(name, data=a)
            for name, future in digests.items():
                f[name].attrs["sha256"] = future.result()

        h5_write(path, fill, sync=False)
        flushed = pool.submit(fsync, path)  # the disk works while we hash
        sha = digest(path)
        flushed.result()
    return sha, path.stat().st_size


def shard_tensors(
    stage: Any, opt: Any, tp_comm: Any = None, state: Any = None, skip: str | None = None
) -> tuple[dict[str, Any], int]:
    """This rank's parameters and optimizer slots as {dataset path: array}, and the step count.
    With tensor parallelism (`tp_comm`, collective over the group) the tensors are whole: every
    rank of the group gathers the shards of each split tensor (so the group's rank 0 holds one
    whole tensor at a time on top of its shards, plus the whole set it writes). `state`: the
    (step count, slots) to store instead of `opt.state_dict()` (--zero 1: joined pieces); `skip`:
    a parameter not stored (a tied head's copy: stored once, as the embedding)."""
    tensors = {dataset_path(k): v for k, v in stage.params.items() if k != skip}
    splits = {dataset_path(k): s for k, s in stage.splits.items()}
    t, slots = state if state is not None else opt.state_dict()
    for slot, arrays in slots.items():
        for k, v in arrays.items():
            if k == skip:
                continue
            tensors[slot_path(slot, k)] = v
            if k in stage.splits:
                splits[slot_path(slot, k)] = stage.splits[k]
    return whole(tensors, splits, stage.tp, tp_comm), t


def save(
    ckpt_dir: str | Path,
    step: int,
    stage: Any,
    opt: Any,
    job: Any,
    grid: Any,
    keep_last: int = 0,
    faults: Faults | None = None,
    zero: Any = None,
    tied_copy: str | None = None,
) -> Path:
    """Collective over the grid: replica 0 of each pipeline rank writes its shard, rank 0 the
    manifest and the one-file view, then the directory is renamed into place and `latest`
    moves. Returns the step directory. An OSError anywhere (no space, no permission, quota, an
    I/O error) removes the temporary directory and raises SaveError on every rank, naming the
    path and errno; the previous checkpoint and `latest` are untouched. With --zero 1 (`zero`,
    parallel/zero.py) the replicas first join their optimizer pieces into replica 0's whole
    tensors (collective over each dp group)."""
    world = grid.world
    root = Path(ckpt_dir)
    rank0 = world.Get_rank() == 0
    tmp, failure = root / f".tmp-{step_name(step)}-{os.getpid()}", None
    if rank0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            failure = io_error(e, tmp)
    tmp, failure = world.bcast((tmp, failure), root=0)
    if failure:
        raise _failed(step, root, failure)
    entry = None
    state = zero.whole_state(opt, keep=grid.replica == 0) if zero is not None else None
    if grid.replica == 0:
        tensors, t = shard_tensors(stage, opt, grid.tp_comm, state, tied_copy)
    if grid.replica == 0 and grid.tp_rank == 0:  # one writer per stage, tensors whole
        name = f"shard_{grid.stage_rank:03d}.h5"
        try:
            sha, size = write_shard(
                tmp / name, tensors, {"pipeline_rank": grid.stage_rank, "step": step}
            )
        except OSError as e:
            failure = f"{io_error(e, tmp / name)} [on rank {world.Get_rank()}]"
        else:
            entry = {
                "scalars": opt.scalars() if hasattr(opt, "scalars") else {},
                "file": name,
                "sha256": sha,
                "bytes": size,
                "layers": sorted(stage.layer_params),
                "t": t,
                "tensors": sorted(tensors),
            }
    reports = world.gather((entry, failure), root=0)
    final = root / step_name(step)
    if rank0:
        failure = next((f for _, f in reports if f), None)
        if failure is None:
            try:
                _commit(root, tmp, final, step, [e for e, _ in reports if e], job, grid, faults)
            except OSError as e:
                failure = io_error(e, root)
        if failure is None and keep_last:
            try:
                prune(root, keep_last, final)
            except (OSError, ConfigError):
                pass  # housekeeping: the next save prunes again
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                failure += f"; {tmp} could not be removed (the next start removes it)"
    failure = world.bcast(failure, root=0)  # nobody moves on before the checkpoint is complete
    if failure:
        raise _failed(step, root, failure)
    return final


def _failed(step: int, root: Path, failure: str) -> SaveError:
    return SaveError(
        f"could not save {step_name(step)}: {failure}; the previous checkpoint and "
        f"{root / 'latest'} are unchanged (free space or fix permissions, then resume with "
        "--resume auto)"
    )


def _commit(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    shards: list[Shard],
    job: Any,
    grid: Any,
    faults: Faults | None,
) -> None:
    """Rank 0, after every shard is written: manifest, view, rename into place, `latest`."""
    _write_manifest(tmp, step, shards, job, grid)
    _write_view(tmp / "model.h5", shards)
    if faults is not None:
        faults.saving(0, step)  # tests: die between the shards and the rename
    fsync(tmp)
    _replace_dir(tmp, final)
    fsync(root)
    pointer = root / ".latest.tmp"
    pointer.write_text(step_name(step) + "\n")
    fsync(pointer)
    os.replace(pointer, root / "latest")
    fsync(root)
    for left in root.glob(".tmp-step_*"):  # leftovers of saves that were killed
        shutil.rmtree(left, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # a re-save of the same step: swap, then drop the old copy
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def _write_manifest(tmp: Path, step: int, shards: list[Shard], job: Any, grid: Any) -> None:
    import mpi4py
    from mpi4py import MPI

    from mpipipe import __version__

    cfg = job.cfg
    data = os.path.abspath(cfg.data) if cfg.data else None  # a glob stays a glob
    eval_data = os.path.abspath(cfg.eval_data) if cfg.eval_data else None
    manifest = {
        "magic": MAGIC,
        "version": VERSION,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # absolute data paths: eval and generate run from anywhere
        "config": {**cfg.to_dict(), "data": data, "eval_data": eval_data},
        "model": {"layers": [s.name for s in job.model.layers], "meta": job.model.meta},
        "schedule": job.plan.name,
        "layout": {
            "pp": grid.pp,
            "dp": grid.dp,
            "tp": grid.tp,
            "rank_order": grid.order,
            "stages": [list(s) for s in job.plan.stages],
        },
        "data": {
            "seed": cfg.seed,
            "next_step": step,
            "note": "batches are a pure function of (seed, split, step)",
        },
        "rng": {"init": "default_rng([seed, global layer index])", "state": "none needed"},
        "optimizer": {
            "name": cfg.optimizer,
            "t": max(s["t"] for s in shards),
            "scalars": shards[0]["scalars"],
        },
        "versions": {
            "mpipipe": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "mpi4py": mpi4py.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        },
        "shards": shards,
    }
    path = tmp / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync(path)


def _write_view(path: Path, shards: list[Shard]) -> None:
    """One HDF5 file whose groups are external links into the shards (same directory)."""

    def fill(f: h5py.File) -> None:
        f.attrs["magic"] = MAGIC
        f.attrs["note"] = "external links into the shard files beside this one"
        for s in shards:
            for group in groups(s["tensors"]):
                f[group] = h5py.ExternalLink(s["file"], "/" + group)

    h5_write(path, fill)
