"""Write ids from any tokenizer as an mpipipe token file: OUT.bin + OUT.bin.json.

The layout is the widespread flat one: little-endian uint16 ids (uint32 when the vocabulary
exceeds 65536), one after another, documents separated by whatever end-of-text id your
tokenizer uses; the sidecar states the dtype and the vocabulary. Replace `tokenize` with your
tokenizer (e.g. tiktoken.get_encoding("gpt2").encode_ordinary, vocabulary 50257):

    python examples/token_file.py corpus.bin && python -m mpipipe data inspect corpus.bin
    mpiexec -n 2 python -m mpipipe train --data corpus.bin --pp 2 --model gpt2-tiny
"""

import sys
from pathlib import Path

from mpipipe.data.tools import write_tokens

VOCAB, END_OF_TEXT = 50257, 50256


def tokenize(text: str) -> list[int]:  # a stand-in: one id per word, stable across runs
    return [sum(map(ord, w)) * 131 % (VOCAB - 1) for w in text.split()]


documents = ["the pipeline splits the model into stages"] * 200 + ["each rank owns a stage"] * 200
ids = ([*tokenize(doc), END_OF_TEXT] for doc in documents)  # a stream: nothing held whole
out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus.bin")
n = write_tokens(out, ids, VOCAB, tokenizer="example word hash")
print(f"wrote {out} ({n} tokens) and {out}.json")
