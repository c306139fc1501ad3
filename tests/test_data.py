"""Token data: .bin (uint16/uint32) and HDF5 sources, replicas reading only their rows, bad
files refused with the fix, exact resume across layouts, GPT-2 presets and their dry run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpipipe import cli
from mpipipe.config import PRESETS, build
from mpipipe.data import Corpus, TokenDataset, open_dataset, resolve
from mpipipe.data.tools import encode, write_tokens
from mpipipe.errors import ConfigError
from tests import mpirun


def ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n)


def bin_file(path: Path, tokens: np.ndarray, vocab: int) -> Path:
    write_tokens(path, [tokens], vocab)
    return path


def h5_file(path: Path, tokens: np.ndarray, vocab: int, dtype: str) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset("corpus/tokens", data=tokens.astype(dtype)).attrs["vocab"] = vocab
    return f"{path}:/corpus/tokens"


def dataset(spec: str, seq_len: int = 8, **flags: object) -> TokenDataset:
    return open_dataset(build({"data": spec, "seq_len": seq_len, **flags}))


@pytest.mark.parametrize(
    ("kind", "vocab", "dtype"),
    [("bin", 50257, "uint16"), ("bin", 100_000, "uint32"), ("h5", 50257, "uint16"),
     ("h5", 100_000, "uint32")],
)  # fmt: skip
def test_windows_are_the_files_tokens(tmp_path, kind, vocab, dtype):
    tokens = ids(5000, vocab)
    if kind == "bin":
        spec = str(bin_file(tmp_path / "c.bin", tokens, vocab))
        assert json.loads((tmp_path / "c.bin.json").read_text())["dtype"] == dtype
    else:
        spec = h5_file(tmp_path / "c.h5", tokens, vocab, dtype)
    ds = dataset(spec)
    assert ds.vocab == vocab and len(ds.train) == 5000
    x, y = ds.batch(3, "train", 6)
    starts = ds.starts(3, "train", 6)
    for row, s in zip(x, starts, strict=True):
        np.testing.assert_array_equal(row, tokens[s : s + 8])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert (ds.starts(0, "eval", 50) >= 4500).all()  # the last 10 % is held out


def test_several_files_concatenate_in_sorted_order(tmp_path):
    """A folder of .bin files (their sidecars skipped) reads as one corpus; a window may span
    two files."""
    parts = [ids(100, 1000, seed) for seed in range(3)]
    for i, p in enumerate(parts):
        bin_file(tmp_path / f"part{2 - i}.bin", p, 1000)  # part2, part1, part0
    corpus = Corpus(resolve(str(tmp_path)))
    whole = np.concatenate(parts[::-1])  # sorted names: part0 (= parts[2]) first
    np.testing.assert_array_equal(corpus.read(0, 300), whole)
    np.testing.assert_array_equal(corpus.read(95, 205), whole[95:205])
    glob = Corpus(resolve(str(tmp_path / "part*.bin")))
    np.testing.assert_array_equal(glob.read(0, 300), whole)


def test_encoded_bytes_train_on_the_same_batches_as_the_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 40)
    assert encode([str(text)], tmp_path / "t.bin") == 256 * 40
    a, b = dataset(str(text), 16), dataset(str(tmp_path / "t.bin"), 16)
    assert b.vocab == 256
    for split in ("train", "eval"):
        for u, v in zip(a.batch(7, split, 5), b.batch(7, split, 5), strict=True):
            np.testing.assert_array_equal(u, v)


def test_a_replica_reads_only_its_rows(tmp_path):
    """Each read goes to the file; the replica's reads are exactly its rows' windows, and the
    union over replicas is the global batch."""
    ds = dataset(str(bin_file(tmp_path / "c.bin", ids(20_000, 50257), 50257)), seq_len=16)
    source = ds.train.sources[0]
    reads: list[tuple[int, int]] = []
    plain = source.read
    source.read = lambda lo, hi: reads.append((lo, hi)) or plain(lo, hi)  # type: ignore[method-assign]
    full_x, _ = ds.batch(4, "train", 32)
    reads.clear()
    starts = ds.starts(4, "train", 32)
    xs = []
    for replica in range(4):
        rows = range(replica * 8, (replica + 1) * 8)
        x, _ = ds.batch(4, "train", 32, rows)
        assert sorted(reads) == sorted(
            (int(s), int(s) + 17) for s in starts[rows.start : rows.stop]
        )
        assert sum(hi - lo for lo, hi in reads) == 8 * 17  # tokens read: 1/4 of the batch's
        reads.clear()
        xs.append(x)
    np.testing.assert_array_equal(np.concatenate(xs), full_x)


def test_the_vocabulary_scan_splits_among_readers_and_names_file_and_offset(tmp_path):
    tokens = ids(10_000, 1000)
    tokens[7777] = 4321
    ds = dataset(str(bin_file(tmp_path / "c.bin", tokens, 5000)), vocab=1000)
    for part in range(3):  # the bad id lies in the last third: only that reader finds it
        ds.scan(part, 4, 1000)
    with pytest.raises(ConfigError) as e:
        ds.scan(3, 4, 1000)
    assert "c.bin: token id 4321 at token offset 7777 is outside the vocabulary of 1000" in str(
        e.value
    )
    assert "--vocab 4322" in str(e.value)
    ds.scan(0, 1, 5000)  # the sidecar's vocabulary holds it


def test_bad_files_are_refused_with_the_fix(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 1001)
    (tmp_path / "odd.bin.json").write_text('{"dtype": "uint16", "vocab": 50257}')
    with pytest.raises(ConfigError, match="1001 bytes is not a multiple of 2 .uint16 tokens.: "):
        dataset(str(odd))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.bin: empty .0 tokens.: re-encode it or leave"):
        dataset(str(empty), data_dtype="uint16", vocab=10)
    bare = tmp_path / "bare.bin"
    bare.write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"dtype is unknown: write bare.bin.json next to it"):
        dataset(str(bare))
    with pytest.raises(ConfigError, match="the vocabulary is unknown: give --vocab N"):
        dataset(str(bare), data_dtype="uint16")
    assert dataset(str(bare), 2, data_dtype="uint16", vocab=10).vocab is None
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x" * 100)
    bin_file(mixed / "b.bin", ids(100, 10), 10)
    with pytest.raises(ConfigError, match="mixes text .a.txt. with token files .b.bin.: give one"):
        dataset(str(mixed))
    h5 = tmp_path / "two.h5"
    with h5py.File(h5, "w") as f:
        f["a"], f["b"] = np.arange(10), np.arange(10)
    with pytest.raises(
        ConfigError, match=r"name the token dataset as .*two.h5:/NAME .it holds /a"
    ):
        dataset(str(h5))
    with pytest.raises(ConfigError, match="--seq-len 64 is larger than the data allows"):
        dataset(str(bin_file(tmp_path / "short.bin", ids(200, 10), 10)), seq_len=64)


def test_presets_set_the_shape_and_flags_still_win():
    cfg = build({"model": "gpt2-medium"})
    assert (cfg.layers, cfg.d_model, cfg.heads, cfg.seq_len, cfg.vocab) == (
        24, 1024, 16, 1024, 50257,
    )  # fmt: skip
    assert build({"model": "gpt2-xl", "layers": 2, "vocab": 300}).layers == 2
    assert PRESETS["gpt2-large"]["heads"] == 20 and cfg.is_gpt


def test_gpt2_small_dry_run_prints_memory_per_stage(capsys):
    """Built from flags alone: no parameter is allocated (a 163M-parameter model would take
    seconds and 2.4 GiB with its optimizer state)."""
    assert cli.main(["train", "--model", "gpt2-small", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gpt 12x768, vocabulary 50257" in out
    assert "   0  embed..head          163.0M    2.43 GiB" in out


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    return str(bin_file(d / "c.bin", ids(20_000, 50257, seed=5), 50257))


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_tiny_preset_on_pp2_then_one_process_resumes_bitwise(tmp_path, tiny_tokens):
    """gpt2-tiny (vocabulary 50257) on a token file: 2 steps on pp = 2 equal one process's
    first 2 bitwise, and resuming that checkpoint on 1 rank continues as if never stopped
    (steps stay inside the warm-up, where the learning rate does not depend on --steps)."""
    flags = ["--model", "gpt2-tiny", "--data", tiny_tokens, "--seq-len", "16",
             "--global-batch", "8", "--microbatches", "4", "--eval-batches", "1",
             "--eval-every", "0", "--warmup", "10"]  # fmt: skip
    ref, split, ck = tmp_path / "ref.jsonl", tmp_path / "split.jsonl", tmp_path / "ck"
    r = mpirun.train(None, *flags, "--steps", "4", "--metrics-file", str(ref), timeout=120)
    assert r.returncode == 0, r.output
    r = mpirun.train(2, *flags, "--steps", "2", "--pp", "2", "--metrics-file", str(split),
                     "--checkpoint-dir", str(ck), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.output
    assert "vocabulary 50257" in r.stdout
    assert losses(split) == losses(ref)[:2]
    r = mpirun.train(1, *flags, "--steps", "4", "--metrics-file", str(split),
                     "--checkpoint-dir", str(ck), "--resume", "auto", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.output
    assert "resumed from" in r.stdout
    assert losses(split) == losses(ref)


def test_an_id_outside_the_vocabulary_stops_every_rank_before_work(tmp_path):
    tokens = ids(4000, 50)
    tokens[3999] = 60
    f = bin_file(tmp_path / "c.bin", tokens, 100)
    r = mpirun.train(2, *mpirun.TINY, "--data", str(f), "--vocab", "50", "--steps", "1",
                     timeout=60)  # fmt: skip
    assert r.returncode == 2, r.output
    assert r.stderr.count("mpipipe: error:") == 1, r.stderr
    assert "token id 60 at token offset 3999 is outside the vocabulary of 50" in r.stderr


def test_gpt2_small_dry_run_on_sixteen_ranks():
    """The layout (pp 8 x dp 2: 12 blocks allow at most 8 stages dividing 16) and the memory
    table, with no model built: about 8 s on 2 cores."""
    r = mpirun.train(16, "--model", "gpt2-small", "--dry-run", timeout=60)
    assert r.returncode == 0, r.output
    assert "pp=8 x dp=2" in r.stdout and "  15  " in r.stdout  # rank 15 in the placement
    table = r.stdout.split("memory per pipeline rank")[1].splitlines()[2:10]
    assert [row.split()[0] for row in table] == [str(k) for k in range(8)]
    assert "block11..head" in table[7] and "embed..block1" in table[0]


def test_the_token_file_example_writes_a_corpus_train_reads(tmp_path):
    out = tmp_path / "ids.bin"
    r = mpirun.run(["examples/token_file.py", str(out)], timeout=60)
    assert r.returncode == 0, r.output
    ds = dataset(str(out), 16)
    assert ds.vocab == 50257 and len(ds.train) == 2800
    assert ds.train.read(0, 2800).max() == 50256  # the end-of-text id separates documents
