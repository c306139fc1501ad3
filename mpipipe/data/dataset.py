"""Random windows of a token corpus, read only where a replica needs them.

Batches are a pure function of (seed, split, step): every rank draws the same `size` window
starts for the global batch, and reads only the rows it asks for (its replica's slice), so the
first stage (inputs) and the last stage (targets) agree without sending tokens around and a
resume on any layout continues the same sequence. The eval split is the last `holdout` fraction
of the corpus, or a separate corpus (`--eval-data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mpipipe.data.sources import Source
from mpipipe.errors import ConfigError

SPLITS = {"train": 0, "eval": 1}


@dataclass
class Corpus:
    """Sources concatenated in order, addressed by a global token offset."""

    sources: Sequence[Source]
    offsets: np.ndarray = field(init=False)  # (n + 1,) first token of each source, then the end

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum([s.length for s in self.sources])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of the concatenation; only those bytes of the files are read."""
        k = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts = []
        while lo < hi:
            start = int(self.offsets[k])
            take = min(hi, int(self.offsets[k + 1]))
            parts.append(self.sources[k].read(lo - start, take - start))
            lo, k = take, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def scan(self, lo: int, hi: int, vocab: int) -> None:
        """Refuse an id outside `vocab` in tokens [lo, hi) (see Source.scan)."""
        for s, a, b in zip(self.sources, self.offsets[:-1], self.offsets[1:], strict=True):
            if lo < b and hi > a:
                s.scan(max(lo, int(a)) - int(a), min(hi, int(b)) - int(a), vocab)

    def close(self) -> None:
        for s in self.sources:
            s.close()


@dataclass
class TokenDataset:
    """Windows of `seq_len + 1` tokens: inputs are the first seq_len, targets the last."""

    train: Corpus
    seq_len: int
    seed: int
    holdout: float = 0.1  # the eval split's fraction of `train`, unless `held_out` is given
    held_out: Corpus | None = None  # --eval-data
    vocab: int | None = None  # from the files' metadata (bytes: 256)

    def split_range(self, split: str) -> tuple[Corpus, int, int]:
        """(corpus, lo, hi): where `split`'s windows start and end."""
        if self.held_out is not None:
            corpus = self.train if split == "train" else self.held_out
            return corpus, 0, len(corpus)
        n = len(self.train)
        cut = n - int(n * self.holdout)
        return (self.train, 0, cut) if split == "train" else (self.train, cut, n)

    def check(self) -> None:
        """Raise ConfigError unless both splits hold at least one window (no data is read)."""
        smallest = min(hi - lo for _, lo, hi in map(self.split_range, SPLITS))
        if smallest < self.seq_len + 1:
            total = len(self.train) + (len(self.held_out) if self.held_out else 0)
            raise ConfigError(
                f"--seq-len {self.seq_len} is larger than the data allows: {total} tokens give "
                f"a {smallest}-token split (use --seq-len <= {max(smallest - 1, 0)} or more data)"
            )

    def starts(self, step: int, split: str, size: int) -> np.ndarray:
        """(size,) the first token of each window of the global batch: a pure function of
        (seed, split, step), drawn whole on every rank so any slice of it is the same."""
        _, lo, hi = self.split_range(split)
        rng = np.random.default_rng([self.seed, SPLITS[split], step])
        return lo + rng.integers(0, hi - lo - self.seq_len, size=size)

    def batch(
        self, step: int, split: str, size: int, rows: range | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (len(rows), seq_len) int64: rows `rows` (default: all) of
        the global batch of `size` windows for `step` of `split`; only those windows are read."""
        corpus, _, _ = self.split_range(split)
        starts = self.starts(step, split, size)[rows if rows is not None else slice(None)]
        window = np.empty((len(starts), self.seq_len + 1), np.int64)  # (rows, T + 1)
        for i, s in enumerate(starts):
            window[i] = corpus.read(int(s), int(s) + self.seq_len + 1)
        return window[:, :-1], window[:, 1:]

    def scan(self, part: int, parts: int, vocab: int) -> None:
        """Refuse an id outside `vocab` in this `part` of `parts` of every corpus: readers split
        the scan, so each reads 1/parts of the data once, before any heavy work."""
        for corpus in (self.train, self.held_out):
            if corpus is not None:
                n = len(corpus)
                corpus.scan(n * part // parts, n * (part + 1) // parts, vocab)

    def close(self) -> None:
        self.train.close()
        if self.held_out is not None:
            self.held_out.close()
