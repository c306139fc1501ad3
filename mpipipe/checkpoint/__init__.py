"""HDF5 checkpoints: one shard per pipeline rank, a manifest, atomic and verifiable.

    DIR/latest                      text: the name of the newest complete checkpoint (a hint)
    DIR/step_000100/manifest.json   config, step, layout, versions, each shard's sha256
    DIR/step_000100/model.h5        external links to every tensor: one file view
    DIR/step_000100/shard_000.h5    /layers/{i}/{name}, /optim/{slot}/{i}/{name}, each with the
                                    sha256 of its bytes as an attribute

Tensors are named by GLOBAL layer index, so any layout loads any checkpoint. A save writes into
a hidden temporary directory, fsyncs every file, renames the directory into place, fsyncs its
parent, and only then replaces `latest` (write, fsync, rename): a crash at any point leaves the
previous checkpoint complete and `latest` pointing at it. A save that fails (no space, no
permission, an I/O error) removes its temporary directory and raises SaveError on every rank.

Finding a checkpoint (`--resume auto`) trusts the step directories, not `latest`: the candidates
are every `step_N`, newest first, that passes a cheap structural check (manifest readable, every
shard present with its recorded size); `load` then checks every byte it reads against its
sha256, and a candidate that fails either check is skipped, naming why. Reading problems are
`Damaged` (skip it), a checkpoint of another model is a plain CheckpointError (stop).

Modules: `base` (names, version, errors), `files` (writes that fail as one OSError), `write`
(save), `read` (manifest, checks, load, tools), `find` (which checkpoint, the directory's upkeep).
"""

from mpipipe.checkpoint.base import (
    MAGIC,
    VERSION,
    CheckpointError,
    Damaged,
    SaveError,
    step_name,
)
from mpipipe.checkpoint.files import io_error
from mpipipe.checkpoint.find import (
    agreed,
    candidates,
    cleanup,
    entries,
    is_step_dir,
    on_root,
    prepare_dir,
    prune,
    resolve,
    restore,
)
from mpipipe.checkpoint.read import check_model, export, inspect, load
from mpipipe.checkpoint.verify import check_structure, read_manifest, verify, verify_shard
from mpipipe.checkpoint.write import save, shard_tensors, write_shard

__all__ = [
    "MAGIC",
    "VERSION",
    "CheckpointError",
    "Damaged",
    "SaveError",
    "agreed",
    "candidates",
    "check_model",
    "check_structure",
    "cleanup",
    "entries",
    "export",
    "inspect",
    "io_error",
    "is_step_dir",
    "load",
    "on_root",
    "prepare_dir",
    "prune",
    "read_manifest",
    "resolve",
    "restore",
    "save",
    "shard_tensors",
    "step_name",
    "verify",
    "verify_shard",
    "write_shard",
]
