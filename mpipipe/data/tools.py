"""`python -m mpipipe data encode IN... -o OUT.bin` and `data inspect FILE`.

    encode   bytes of text files (files, folders, quoted globs; sorted, concatenated) into a
             uint16 token file OUT.bin and its sidecar OUT.bin.json, streamed in chunks
    inspect  files, tokens, vocabulary, dtype and a decoded sample (byte vocabularies)

A corpus tokenized elsewhere needs no tool: write the ids as little-endian uint16 (uint32 for
vocabularies over 65535) and the sidecar beside them (`write_tokens`, examples/token_file.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mpipipe.data.dataset import Corpus
from mpipipe.data.sources import BYTES_VOCAB, resolve, sidecar
from mpipipe.errors import ConfigError

CHUNK = 1 << 24  # bytes per read while encoding


def write_tokens(out: Path, ids: Iterable[Any], vocab: int, tokenizer: str = "") -> int:
    """Write token ids (arrays or lists, in order) to `out` (.bin) and its JSON sidecar; the
    dtype is uint16 when the vocabulary fits, else uint32. Returns the number of tokens."""
    if out.suffix != ".bin":
        raise ConfigError(f"-o {out}: token files end in .bin (e.g. -o corpus.bin)")
    dtype = np.dtype("<u2" if vocab <= 1 << 16 else "<u4")
    n = 0
    with open(out, "wb") as fh:
        for part in ids:
            a = np.asarray(part)
            if a.size and (a.min() < 0 or a.max() >= vocab):
                bad = int(a.max() if a.max() >= vocab else a.min())
                raise ConfigError(f"token id {bad} is outside the vocabulary of {vocab}")
            fh.write(a.astype(dtype).tobytes())
            n += a.size
    meta = {"dtype": dtype.name, "vocab": vocab, "tokens": n, "tokenizer": tokenizer}
    sidecar(out).write_text(json.dumps(meta, indent=1) + "\n")
    return n


def encode(inputs: list[str], out: Path) -> int:
    """Bytes of `inputs` (each a file, folder or glob) as a uint16 token file."""
    files = [s.path for spec in inputs for s in resolve(spec, flag="encode")]
    text = [f for f in files if f.suffix in (".bin", ".h5", ".hdf5")]
    if text:
        raise ConfigError(f"encode {text[0]}: already a token file (encode reads text)")

    def chunks() -> Iterable[np.ndarray]:
        for f in files:
            with open(f, "rb") as fh:
                while block := fh.read(CHUNK):
                    yield np.frombuffer(block, np.uint8)

    return write_tokens(out, chunks(), BYTES_VOCAB, "bytes")


def inspect(spec: str, dtype: str | None = None, sample: int = 200) -> str:
    sources = resolve(spec, dtype)
    corpus = Corpus(sources)
    vocab = next((s.vocab for s in sources if s.vocab is not None), None)
    lines = [f"{s}  {s.kind}  {s.dtype.name}  {s.length:,} tokens" for s in sources]
    lines.append(
        f"total: {len(corpus):,} tokens in {len(sources)} file(s), "
        f"vocabulary {vocab if vocab is not None else 'unknown (give --vocab when training)'}"
    )
    head = corpus.read(0, min(sample, len(corpus)))
    if vocab == BYTES_VOCAB:
        text = bytes(head.astype(np.uint8)).decode("utf-8", errors="replace")
        lines.append(f"first {len(head)} tokens as text:\n{text}")
    else:
        lines.append(f"first {len(head)} ids: {' '.join(map(str, head[:50]))} ...")
    corpus.close()
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from mpipipe.flags import Parser

    p = Parser(prog="mpipipe data", description="Make and inspect token files.")
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("encode", help="bytes of text files -> OUT.bin (uint16) + OUT.bin.json")
    e.add_argument("inputs", nargs="+", help="files, folders or quoted globs")
    e.add_argument("-o", "--out", required=True, help="the token file to write (.bin)")
    i = sub.add_parser("inspect", help="tokens, vocabulary, dtype and a sample")
    i.add_argument("file", help="a token or text file, FILE.h5:/NAME, a folder or a glob")
    i.add_argument("--data-dtype", choices=("uint16", "uint32"), help="for .bin without sidecar")
    a = p.parse_args(argv)
    if a.action == "encode":
        n = encode(a.inputs, Path(a.out))
        print(f"wrote {a.out}: {n:,} tokens (uint16, vocabulary {BYTES_VOCAB}) and {a.out}.json")
    else:
        print(inspect(a.file, a.data_dtype))
    return 0
