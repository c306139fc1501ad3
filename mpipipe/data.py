"""Byte-level text data: any file, folder or glob, or a built-in corpus that needs no download.

The built-in corpus is the Python standard library's own top-level `*.py` files in sorted order
(about 4.7 MB on CPython 3.11). Batches are a pure function of (seed, split, step): every rank
that asks gets the same global batch, so the first stage (inputs) and the last stage (targets)
agree without sending tokens around. The last `holdout` fraction of the bytes is the eval split.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpipipe.errors import ConfigError

SPLITS = {"train": 0, "eval": 1}


def builtin_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def resolve(data: str | None) -> list[Path]:
    """The files behind `--data`: a file, every file under a folder, or a glob; None: built-in."""
    if data is None:
        return builtin_files()
    p = Path(data)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(data, recursive=True) if os.path.isfile(f))
    if not files:
        raise ConfigError(
            f"--data {data}: no such file, folder or matching glob "
            "(give a text file, a folder of files, or a quoted glob like 'docs/*.txt')"
        )
    return files


@dataclass
class ByteDataset:
    """Random windows of `seq_len + 1` bytes: inputs are the first seq_len, targets the last."""

    files: list[Path]
    seq_len: int
    seed: int
    holdout: float = 0.1

    def __post_init__(self) -> None:
        self.size = sum(f.stat().st_size for f in self.files)
        self._tokens: np.ndarray | None = None

    def check(self) -> None:
        """Raise ConfigError unless every file opens for reading and both splits hold at least
        one window (no data is read)."""
        for f in self.files:
            try:
                with open(f, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(
                    f"--data {f}: cannot be read ({e.strerror}); fix its permissions or leave it "
                    "out of --data"
                ) from None
        n_eval = int(self.size * self.holdout)
        smallest = min(self.size - n_eval, n_eval)
        if smallest < self.seq_len + 1:
            raise ConfigError(
                f"--seq-len {self.seq_len} is larger than the data allows: {self.size} bytes give "
                f"a {smallest}-byte split (use --seq-len <= {max(smallest - 1, 0)} or more data)"
            )

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            chunks = []
            for f in self.files:
                try:
                    chunks.append(f.read_bytes())
                except OSError as e:  # it opened at the check: it changed, or the disk failed
                    raise ConfigError(f"--data {f}: cannot be read ({e.strerror})") from None
            self._tokens = np.frombuffer(b"".join(chunks), np.uint8)
        return self._tokens

    def batch(self, step: int, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (size, seq_len) int64, for `step` of `split`."""
        toks = self.tokens
        cut = len(toks) - int(len(toks) * self.holdout)
        lo, hi = (0, cut) if split == "train" else (cut, len(toks))
        rng = np.random.default_rng([self.seed, SPLITS[split], step])
        starts = lo + rng.integers(0, hi - lo - self.seq_len, size=size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (size, T + 1)
        window = toks[idx].astype(np.int64)
        return window[:, :-1], window[:, 1:]
