"""The checkpoint format's names, version and errors, shared by the modules that write, read
and find checkpoints."""

from __future__ import annotations

import re

from mpipipe.errors import ConfigError
from mpipipe.stage import split_name

MAGIC, VERSION = "mpipipe-checkpoint", 2
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, damaged, or not of this model."""


class Damaged(CheckpointError):
    """A checkpoint that is unreadable, incomplete, corrupted or of another format version:
    `--resume auto` skips it for an older one."""


class SaveError(ConfigError):
    """A save that failed on I/O; the previous checkpoint and `latest` are untouched."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def dataset_path(name: str) -> str:
    """'layers.3.attn.qkv.w' -> 'layers/3/attn/qkv/w'."""
    layer, param = split_name(name)
    return f"layers/{layer}/{param.replace('.', '/')}"


def slot_path(slot: str, name: str) -> str:
    """Optimizer slot `slot` of parameter `name`: 'm', 'layers.3.attn.qkv.w' ->
    'optim/m/3/attn/qkv/w'."""
    layer, param = split_name(name)
    return f"optim/{slot}/{layer}/{param.replace('.', '/')}"


def groups(tensors: list[str]) -> list[str]:
    """The per-layer groups of dataset paths: layers/{i} and optim/{slot}/{i}, in order."""
    depth = {"layers": 2, "optim": 3}  # layers/3/attn/qkv/w, optim/m/3/attn/qkv/w
    out = set()
    for name in tensors:
        parts = name.split("/")
        out.add("/".join(parts[: depth[parts[0]]]))
    return sorted(out)
