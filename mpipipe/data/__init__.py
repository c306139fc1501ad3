"""Training data: text (bytes), token files (`.bin` + sidecar, HDF5), read only where needed.

`open_dataset(cfg)` is what a job uses: the sources behind `--data` (and `--eval-data`), their
metadata checked and no token read. Ranks then read only their replica's windows of each batch
(dataset.py), and the ranks that read data split one scan for ids outside the vocabulary.
The built-in corpus is the Python standard library's own top-level `*.py` files in sorted order
(about 4.7 MB on CPython 3.11); no download.
"""

from __future__ import annotations

from typing import Any

from mpipipe.data.dataset import SPLITS, Corpus, TokenDataset
from mpipipe.data.sources import BYTES_VOCAB, TOKEN_DTYPES, Source, builtin_files, resolve, sidecar
from mpipipe.errors import ConfigError


def open_dataset(cfg: Any) -> TokenDataset:
    """The dataset `cfg` asks for (`data`, `eval_data`, `data_dtype`, `holdout`, `seq_len`,
    `seed`); raises ConfigError naming the file and the fix."""
    train = resolve(cfg.data, cfg.data_dtype)
    held = resolve(cfg.eval_data, cfg.data_dtype, "--eval-data") if cfg.eval_data else None
    vocabs = {s.vocab for s in train + (held or []) if s.vocab is not None}
    if len(vocabs) > 1:
        raise ConfigError(
            f"--data has a vocabulary of {min(vocabs)} but --eval-data one of {max(vocabs)} "
            "(evaluate on data from the same tokenizer)"
        )
    vocab = vocabs.pop() if vocabs else None
    if vocab is None and cfg.vocab is None:
        raise ConfigError(
            f"--data {cfg.data}: the vocabulary is unknown: give --vocab N, or write it in the "
            'sidecar (e.g. {"dtype": "uint16", "vocab": 50257})'
        )
    held_out = Corpus(held) if held is not None else None
    ds = TokenDataset(Corpus(train), cfg.seq_len, cfg.seed, cfg.holdout, held_out, vocab)
    ds.check()
    return ds


__all__ = [
    "BYTES_VOCAB",
    "SPLITS",
    "TOKEN_DTYPES",
    "Corpus",
    "Source",
    "TokenDataset",
    "builtin_files",
    "open_dataset",
    "resolve",
    "sidecar",
]
