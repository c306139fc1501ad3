"""Token sources behind `--data`: text (bytes), flat `.bin` token files, HDF5 token datasets.

A source is one file's tokens, opened lazily and read by range: `.bin` and text files by
positional reads of only that range (`os.pread`; see `Source.read` for why not a memory map),
HDF5 through hyperslab reads.
`resolve` turns a `--data` spec (a file, a folder, a glob, each optionally `...h5:/dataset`) into
sources in sorted order; `check` validates sizes and metadata without reading tokens, and
`scan` reads a range in chunks to refuse an id outside the vocabulary, naming the file and the
offset.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpipipe.errors import ConfigError

TOKEN_DTYPES = ("uint16", "uint32")
BYTES_VOCAB = 256
H5_SUFFIXES = (".h5", ".hdf5")
SCAN_CHUNK = 1 << 20  # tokens per read when scanning for ids outside the vocabulary


def builtin_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def sidecar(path: Path) -> Path:
    """Where a token file's metadata lives: `OUT.bin.json`."""
    return path.with_name(path.name + ".json")


@dataclass
class Source:
    """One file's tokens. kind: "bytes" (any file, vocabulary 256), "bin" (little-endian
    uint16/uint32 ids) or "h5" (a 1-D integer dataset `name` in an HDF5 file)."""

    path: Path
    kind: str
    dtype: np.dtype[Any]
    vocab: int | None  # from metadata; None: not stated
    name: str = ""  # the HDF5 dataset
    length: int = 0  # tokens
    _handle: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.name}" if self.kind == "h5" else str(self.path)

    def array(self) -> Any:
        """The tokens as a lazily read array (h5py dataset, or an open file for positional
        reads); nothing is read yet."""
        if self._handle is None:
            try:
                if self.kind == "h5":
                    import h5py

                    self._handle = h5py.File(self.path, "r")[self.name]
                else:
                    self._handle = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            except OSError as e:  # it opened at the check: it changed, or the disk failed
                raise RuntimeError(f"--data {self}: cannot be read ({e})") from None
        return self._handle

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as a NumPy array: a copy of only that range. Files are read with
        positional reads rather than through a memory map: mapped pages count as this
        process's resident memory and pile up as random windows touch the whole file over a
        long run, while read pages stay in the kernel's shared page cache."""
        handle = self.array()
        if self.kind == "h5":
            return np.asarray(handle[lo:hi])
        size = self.dtype.itemsize
        data = os.pread(handle.fileno(), (hi - lo) * size, lo * size)
        if len(data) != (hi - lo) * size:
            # mid-run on one rank: an exception that aborts every rank, not a ConfigError
            raise RuntimeError(f"--data {self}: shorter than when checked (did it change?)")
        return np.frombuffer(data, self.dtype)

    def scan(self, lo: int, hi: int, vocab: int) -> None:
        """Refuse an id >= vocab in tokens [lo, hi), reading SCAN_CHUNK tokens at a time."""
        if self.kind == "bytes" and vocab >= BYTES_VOCAB:
            return
        for a in range(lo, hi, SCAN_CHUNK):
            b = min(hi, a + SCAN_CHUNK)
            chunk = self.read(a, b)
            bad = (chunk >= vocab) | (chunk < 0) if chunk.dtype.kind == "i" else chunk >= vocab
            if bad.any():
                at = a + int(np.argmax(bad))
                raise ConfigError(
                    f"--data {self}: token id {int(chunk[at - a])} at token offset {at} is "
                    f"outside the vocabulary of {vocab} (give --vocab {int(chunk.max()) + 1} or "
                    "more if the file is right, or re-encode it with the model's tokenizer)"
                )

    def close(self) -> None:
        if self._handle is not None:
            (self._handle.file if self.kind == "h5" else self._handle).close()
        self._handle = None


def resolve(data: str | None, dtype: str | None = None, flag: str = "--data") -> list[Source]:
    """The sources behind a `--data` spec: a file, every file under a folder, or a glob, in
    sorted order; `SPEC:/name` names the dataset in HDF5 files. None: the built-in corpus."""
    if data is None:
        return [open_source(f, None, dtype, flag) for f in builtin_files()]
    spec, name = data, None
    if ":/" in data and not Path(data).exists():
        spec, name = data.rsplit(":/", 1)
        name = "/" + name
    p = Path(spec)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    listed = set(files)
    files = [f for f in files if not (f.suffix == ".json" and f.with_suffix("") in listed)]
    if not files:
        raise ConfigError(
            f"{flag} {data}: no such file, folder or matching glob (give a text file, a token "
            "file OUT.bin, an HDF5 file FILE.h5:/tokens, a folder of them, or a quoted glob "
            "like 'docs/*.txt')"
        )
    sources = [open_source(f, name, dtype, flag) for f in files]
    kinds = {s.kind == "bytes" for s in sources}
    if len(kinds) > 1:
        text = next(s for s in sources if s.kind == "bytes")
        tok = next(s for s in sources if s.kind != "bytes")
        raise ConfigError(
            f"{flag} {data} mixes text ({text.path.name}) with token files ({tok.path.name}): "
            "give one kind (encode the text with `python -m mpipipe data encode`)"
        )
    vocabs = {s.vocab for s in sources if s.vocab is not None}
    if len(vocabs) > 1:
        a, b = sorted(vocabs)[:2]
        sa = next(s for s in sources if s.vocab == a)
        sb = next(s for s in sources if s.vocab == b)
        raise ConfigError(
            f"{flag} {data}: {sa} has a vocabulary of {a} but {sb} one of {b} (the files of one "
            "corpus come from one tokenizer: give them separately, or fix the sidecars)"
        )
    return [s for s in sources if s.length or s.kind != "bytes"]  # empty text adds nothing


def open_source(path: Path, name: str | None, dtype: str | None, flag: str) -> Source:
    """A source with its metadata and length, checked; no token is read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{flag} {path}: cannot be read ({e.strerror}); fix its permissions or leave it out "
            f"of {flag}"
        ) from None
    if path.suffix in H5_SUFFIXES:
        return _open_h5(path, name, flag)
    size = path.stat().st_size
    if path.suffix != ".bin":
        return Source(path, "bytes", np.dtype(np.uint8), BYTES_VOCAB, length=size)
    meta = _read_sidecar(path, flag)
    declared = meta.get("dtype")
    if dtype and declared and dtype != declared:
        raise ConfigError(
            f"{flag} {path}: --data-dtype {dtype} but {sidecar(path).name} says {declared} "
            "(leave out --data-dtype, or fix the sidecar)"
        )
    kind = declared or dtype
    if kind is None:
        raise ConfigError(
            f"{flag} {path}: its token dtype is unknown: write {sidecar(path).name} next to it "
            '(e.g. {"dtype": "uint16", "vocab": 50257}) or give --data-dtype uint16|uint32'
        )
    if kind not in TOKEN_DTYPES:
        raise ConfigError(f"{flag} {path}: dtype {kind!r} is not one of {', '.join(TOKEN_DTYPES)}")
    dt = np.dtype(kind).newbyteorder("<")
    if size == 0:
        raise ConfigError(f"{flag} {path}: empty (0 tokens): re-encode it or leave it out")
    if size % dt.itemsize:
        raise ConfigError(
            f"{flag} {path}: {size} bytes is not a multiple of {dt.itemsize} ({kind} tokens): "
            f"the file is truncated or not {kind} (re-encode it, or fix the dtype in "
            f"{sidecar(path).name} / --data-dtype)"
        )
    vocab = meta.get("vocab")
    return Source(path, "bin", dt, int(vocab) if vocab else None, length=size // dt.itemsize)


def _read_sidecar(path: Path, flag: str) -> dict[str, Any]:
    side = sidecar(path)
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: {side.name} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab", 1), int):
        raise ConfigError(
            f'{flag} {path}: {side.name} must be an object like {{"dtype": "uint16", '
            '"vocab": 50257}'
        )
    return meta


def _open_h5(path: Path, name: str | None, flag: str) -> Source:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if name is None:
                found: list[str] = []
                f.visititems(
                    lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None
                )
                if len(found) != 1:
                    raise ConfigError(
                        f"{flag} {path}: name the token dataset as {path}:/NAME (it holds "
                        f"{', '.join(found) or 'no dataset'})"
                    )
                name = found[0]
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise ConfigError(f"{flag} {path}: no dataset {name} (name it as {path}:/NAME)")
            if ds.ndim != 1 or ds.dtype.kind not in "iu":
                raise ConfigError(
                    f"{flag} {path}:{name}: a {ds.ndim}-D {ds.dtype} dataset; token ids must be "
                    "a 1-D integer dataset"
                )
            if ds.shape[0] == 0:
                raise ConfigError(f"{flag} {path}:{name}: empty (0 tokens): leave it out")
            vocab = ds.attrs.get("vocab", f.attrs.get("vocab"))
            return Source(
                path, "h5", ds.dtype, int(vocab) if vocab is not None else None, name,
                int(ds.shape[0]),
            )  # fmt: skip
    except OSError as e:
        raise ConfigError(f"{flag} {path}: not a readable HDF5 file ({e})") from None
