"""Checking a checkpoint without loading it: the manifest field by field, the cheap structural
check (every shard a file of the recorded size) and the full verification (every byte hashed,
the one-file view's links)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpipipe.checkpoint.base import MAGIC, VERSION, Damaged, groups
from mpipipe.checkpoint.files import H5_ERRORS, digest, errno_text, first_line, sha256

# the manifest fields the runtime and the tools read, "a.b" for nested ones
_SCHEMA: dict[str, type] = {
    "step": int,
    "time": str,
    "config": dict,
    "schedule": str,
    "versions": dict,
    "shards": list,
    "model.layers": list,
    "model.meta": dict,
    "layout.pp": int,
    "layout.dp": int,
    "layout.rank_order": str,
    "optimizer.name": str,
    "optimizer.t": int,
}
_SHARD_SCHEMA: dict[str, type] = {
    "file": str,
    "sha256": str,
    "bytes": int,
    "layers": list,
    "t": int,
    "tensors": list,
}
_SHARD_FILE = re.compile(r"shard_\d+\.h5")
_TOPS = ("layers", "optim")


def _field(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _schema_problem(m: dict[str, Any]) -> str | None:
    """What makes a manifest unusable (a field missing or of the wrong type, shards that do not
    cover the model's layers exactly once), or None."""
    for key, kind in _SCHEMA.items():
        if not isinstance(_field(m, key), kind):
            return f"field {key!r} is missing or not a {kind.__name__}"
    covered: list[Any] = []
    for i, e in enumerate(m["shards"]):
        for key, kind in _SHARD_SCHEMA.items():
            if not isinstance(_field(e, key), kind):
                return f"shards[{i}].{key} is missing or not a {kind.__name__}"
        if not _SHARD_FILE.fullmatch(e["file"]):
            return f"shards[{i}].file {e['file'][:40]!r} is not a shard_N.h5 name"
        if not all(isinstance(t, str) and t.split("/")[0] in _TOPS for t in e["tensors"]):
            return f"shards[{i}].tensors holds a name outside {' and '.join(_TOPS)}"
        covered += e["layers"]
    ints = all(isinstance(i, int) for i in covered)
    if not ints or sorted(covered) != list(range(len(m["model"]["layers"]))):
        n = len(m["model"]["layers"])
        return f"the shards' layers are not each of the model's {n} layers once"
    return None


def read_manifest(step_dir: Path) -> dict[str, Any]:
    """The manifest, checked for every field the runtime and the tools read; Damaged if it is
    missing, unreadable, not JSON, or of another format version."""
    path = step_dir / "manifest.json"
    if not step_dir.is_dir():
        raise Damaged(f"{step_dir}: not a directory")
    if not path.is_file():
        raise Damaged(f"{path}: missing (the save did not finish, or it was removed)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Damaged(f"{path}: cannot be read ({errno_text(e)})") from None
    if not raw.strip():
        raise Damaged(f"{path}: empty")
    try:
        m = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Damaged(f"{path}: not text (binary garbage)") from None
    except json.JSONDecodeError as e:
        raise Damaged(f"{path}: not valid JSON, truncated or corrupted ({e.msg})") from None
    if not isinstance(m, dict) or m.get("magic") != MAGIC:
        raise Damaged(f"{path}: not an mpipipe checkpoint manifest (no magic {MAGIC!r})")
    if m.get("version") != VERSION:
        raise Damaged(
            f"{path}: checkpoint format version {m.get('version')!r}, this mpipipe reads "
            f"version {VERSION} (use the mpipipe version that wrote it)"
        )
    if problem := _schema_problem(m):
        raise Damaged(f"{path}: {problem} (written by another version, or edited?)")
    return m


def check_structure(step_dir: Path) -> dict[str, Any]:
    """The manifest, after checking that every shard is a file of the recorded size: cheap (no
    byte is hashed), so resume passes over a checkpoint whose save was cut short before it
    reads anything. Damaged otherwise."""
    m = read_manifest(step_dir)
    check_sizes(step_dir, m["shards"])
    return m


def check_sizes(step_dir: Path, shards: list[dict[str, Any]]) -> None:
    for e in shards:
        path = step_dir / e["file"]
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as err:
            raise Damaged(f"{path}: cannot be read ({errno_text(err)})") from None
        if size is None:
            raise Damaged(f"{path}: missing")
        if size != e["bytes"]:
            raise Damaged(
                f"{path}: {size} bytes, the manifest says {e['bytes']} (truncated or replaced)"
            )


def verify_shard(step_dir: Path, entry: dict[str, Any]) -> str | None:
    """None if the shard is intact, else a message naming the file (and the dataset)."""
    path = step_dir / entry["file"]
    if not path.is_file():
        return f"{path}: missing"
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            return (
                f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
            )
        if digest(path) == entry["sha256"]:
            return None
    except OSError as e:
        return f"{path}: cannot be read ({errno_text(e)})"
    where = _bad_dataset(path) or "its metadata (no dataset fails its own checksum)"
    return (
        f"{path}: sha256 does not match the manifest (truncated or corrupted); "
        f"damage found in {where}"
    )


def _bad_dataset(path: Path) -> str | None:
    """'dataset NAME' for the first dataset whose bytes do not match its sha256 attribute (or
    cannot be read), or what is wrong with the file itself."""
    try:
        with h5py.File(path, "r") as f:
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            for n in names:
                try:
                    if sha256(np.ascontiguousarray(f[n][...])) != f[n].attrs.get("sha256"):
                        return f"dataset {n}"
                except H5_ERRORS:
                    return f"dataset {n}"
    except H5_ERRORS as e:
        return f"the file itself, which HDF5 cannot open ({first_line(e)})"
    return None


def verify_view(step_dir: Path, m: dict[str, Any]) -> str | None:
    """None if model.h5 opens and links every layer group to the shard that holds it."""
    path = step_dir / "model.h5"
    if not path.is_file():
        return f"{path}: missing"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("magic") != MAGIC:
                return f"{path}: not an mpipipe view (no magic attribute)"
            for e in m["shards"]:
                for group in groups(e["tensors"]):
                    link = f.get(group, getlink=True)
                    if not (
                        isinstance(link, h5py.ExternalLink)
                        and link.filename == e["file"]
                        and link.path == "/" + group
                    ):
                        return f"{path}: {group} is not a link to {e['file']}"
    except H5_ERRORS as e:
        return f"{path}: not a readable HDF5 file ({first_line(e)})"
    return None


def verify(step_dir: Path) -> list[str]:
    """Every problem with what a resume, eval or export reads: the manifest (Damaged is raised),
    each shard's size and sha256, the one-file view's links. Empty: intact."""
    m = read_manifest(step_dir)
    problems = [msg for e in m["shards"] if (msg := verify_shard(step_dir, e))]
    if view := verify_view(step_dir, m):
        problems.append(view)
    return problems
