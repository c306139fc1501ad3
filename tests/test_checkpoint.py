"""Checkpoints: exact resume, any layout, atomic under SIGKILL, corruption refused, pruning,
preemption by signal, the one-file view, and the ckpt / eval / generate commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import mpirun
from tests.background import Job

SMALL = [
    "--layers",
    "8",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--seq-len",
    "16",
    "--global-batch",
    "16",
    "--microbatches",
    "4",
    "--eval-batches",
    "1",
    "--eval-every",
    "0",
    "--dtype",
    "float64",
]


def tensors(step_dir: Path) -> dict[str, np.ndarray]:
    """Every parameter and optimizer tensor of a checkpoint, by dataset name."""
    out = {}
    for shard in sorted(step_dir.glob("shard_*.h5")):
        with h5py.File(shard, "r") as f:
            f.visititems(
                lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None
            )
    return out


def assert_same(a: dict, b: dict, rel: float = 0.0) -> None:
    assert sorted(a) == sorted(b) and len(a) > 50
    for k in a:
        if rel == 0.0:
            assert np.array_equal(a[k], b[k]), k
        else:
            d = np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)
            assert d < rel, f"{k}: relative difference {d:.3g}"


def run(n, *flags, **env):
    r = mpirun.train(n, *SMALL, *flags, timeout=240, **env)
    assert r.returncode == 0, r.output
    return r


# 4 ranks: four stages' shards and AdamW state (test_any_layout_loads_any_checkpoint resumes on
# 1, 2, 4 and 16 ranks)
@pytest.mark.parametrize("ranks", [4])
def test_ten_plus_ten_equals_twenty_bitwise(tmp_path, ranks):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(ranks, "--steps", "20", "--checkpoint-dir", str(straight))
    run(ranks, "--steps", "10", "--checkpoint-dir", str(split))
    r = run(ranks, "--steps", "20", "--checkpoint-dir", str(split), "--resume", "auto")
    assert "resumed from" in r.stdout and "step 11/20" in r.stdout
    assert (split / "latest").read_text().strip() == "step_000020"
    assert_same(tensors(straight / "step_000020"), tensors(split / "step_000020"))


def test_any_layout_loads_any_checkpoint(tmp_path):
    """Saved with (pp, dp, schedule) = (4, 1, 1f1b), resumed on other grids. The arithmetic
    does not depend on pp, so dp = 1 continues bitwise; dp = 2 sums gradients in another order
    (equal to 1e-12). SGD, since Adam's sign-like first steps amplify rounding noise in
    gradients that are mathematically zero (see tests/test_data_parallel.py)."""
    sgd = ["--optimizer", "sgd", "--lr", "0.05"]
    ref = tmp_path / "ref"
    run(4, *sgd, "--steps", "6", "--checkpoint-dir", str(ref))
    base = tmp_path / "base"
    run(4, *sgd, "--steps", "3", "--checkpoint-dir", str(base))
    want = tensors(ref / "step_000006")
    for n, flags, rel in [
        (1, [], 0.0),
        (2, ["--pp", "2"], 0.0),
        (4, ["--pp", "2", "--dp", "2", "--schedule", "gpipe"], 1e-12),
        (16, ["--pp", "8", "--dp", "2", "--schedule", "zb-h1"], 1e-12),
    ]:
        d = tmp_path / f"resume{n}{'-'.join(flags)}"
        shutil.copytree(base, d)
        r = run(n, *sgd, *flags, "--steps", "6", "--checkpoint-dir", str(d), "--resume", "auto")
        assert "resumed from" in r.stdout
        assert_same(tensors(d / "step_000006"), want, rel)


@pytest.mark.openmpi
@pytest.mark.parametrize("ranks", [2])  # the save path is the same on any number of ranks
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, ranks):
    d, ref = tmp_path / "ck", tmp_path / "ref"
    r = mpirun.train(
        ranks,
        *SMALL,
        "--steps",
        "6",
        "--save-every",
        "2",
        "--checkpoint-dir",
        str(d),
        "--inject-fault",
        "kill-in-save@0:4",
        timeout=120,
    )
    assert r.returncode != 0  # rank 0 was SIGKILLed in the middle of saving step 4
    assert (d / "latest").read_text().strip() == "step_000002"
    assert not (d / "step_000004").exists() and list(d.glob(".tmp-step_000004-*"))
    v = mpirun.run(["-m", "mpipipe", "ckpt", "verify", str(d)], timeout=60)
    assert v.returncode == 0 and "step_000002: OK" in v.stdout, v.output
    run(ranks, "--steps", "6", "--save-every", "2", "--checkpoint-dir", str(d), "--resume", "auto")
    assert not list(d.glob(".tmp-step_*"))  # the next complete save cleaned up the leftover
    run(ranks, "--steps", "6", "--checkpoint-dir", str(ref))
    assert_same(tensors(d / "step_000006"), tensors(ref / "step_000006"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "ck"
    r = mpirun.train(
        2,
        *SMALL,
        "--steps",
        "3",
        "--save-every",
        "1",
        "--keep-last",
        "2",
        "--checkpoint-dir",
        str(d),
        timeout=120,
    )
    assert r.returncode == 0, r.output
    return d


def test_keep_last_prunes_old_checkpoints(saved):
    assert sorted(p.name for p in saved.glob("step_*")) == ["step_000002", "step_000003"]
    assert (saved / "latest").read_text().strip() == "step_000003"


def test_one_file_view_reads_through_external_links(saved):
    step = saved / "step_000003"
    with h5py.File(step / "model.h5", "r") as f:
        w = f["layers/3/attn/attn/qkv/w"][...]
        m = f["optim/m/3/attn/attn/qkv/w"][...]
        assert len(f["layers"]) == 10  # embedding, 8 blocks, head
    assert np.array_equal(w, tensors(step)["layers/3/attn/attn/qkv/w"])
    assert m.shape == w.shape and np.abs(m).max() > 0


def test_ckpt_commands(saved, tmp_path):
    r = mpirun.run(["-m", "mpipipe", "ckpt", "inspect", str(saved)], timeout=60)
    assert r.returncode == 0 and "step 3" in r.stdout and r.stdout.count("checksum OK") == 2
    out = tmp_path / "all.h5"
    r = mpirun.run(["-m", "mpipipe", "ckpt", "export", str(saved), str(out)], timeout=60)
    assert r.returncode == 0, r.output
    moved = tmp_path / "elsewhere.h5"
    shutil.move(out, moved)  # self-contained: no links back into the checkpoint
    with h5py.File(moved, "r") as f:
        assert f.attrs["step"] == 3
        assert np.array_equal(
            f["layers/3/attn/attn/qkv/w"][...],
            tensors(saved / "step_000003")["layers/3/attn/attn/qkv/w"],
        )


def _corrupt_copy(saved: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(saved, d)
    return d


def test_flipped_byte_is_refused_naming_file_and_dataset(saved, tmp_path):
    """verify names the file and the dataset; --resume auto passes over the damaged checkpoint
    (saying so) to the older one; --resume of that step directory itself refuses it."""
    d = _corrupt_copy(saved, tmp_path)
    shard = d / "step_000003" / "shard_001.h5"
    with h5py.File(shard, "r") as f:  # where the tensor's bytes lie in the file
        offset = f["layers/9/lm_head/w"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[offset + 100] ^= 0x01
    shard.write_bytes(bytes(data))
    r = mpirun.run(["-m", "mpipipe", "ckpt", "verify", str(d)], timeout=60)
    assert r.returncode == 1
    assert "shard_001.h5: sha256 does not match" in r.stdout
    assert "dataset layers/9/lm_head/w" in r.stdout
    t = mpirun.train(
        2, *SMALL, "--steps", "5", "--checkpoint-dir", str(d), "--resume", "auto", timeout=60
    )
    assert t.returncode == 0, t.output
    skip = next(line for line in t.stdout.splitlines() if "skipping" in line)
    assert "step_000003" in skip and "shard_001.h5" in skip and "lm_head" in skip, skip
    assert f"resumed from {d / 'step_000002'} (step 2)" in t.stdout
    t = mpirun.train(2, *SMALL, "--steps", "5", "--resume", str(d / "step_000003"), timeout=60)
    assert t.returncode == 2 and "shard_001.h5" in t.stderr and "lm_head" in t.stderr, t.output
    assert "Traceback" not in t.output


def test_truncated_shard_is_refused(saved, tmp_path):
    d = _corrupt_copy(saved, tmp_path)
    shard = d / "step_000003" / "shard_000.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    t = mpirun.train(2, *SMALL, "--steps", "5", "--resume", str(d / "step_000003"), timeout=60)
    assert t.returncode == 2 and "shard_000.h5: 5000 bytes, the manifest says" in t.stderr, (
        t.output
    )
    t = mpirun.train(
        2, *SMALL, "--steps", "5", "--checkpoint-dir", str(d), "--resume", "auto", timeout=60
    )
    assert t.returncode == 0 and "shard_000.h5: 5000 bytes, the manifest says" in t.stdout
    assert f"resumed from {d / 'step_000002'} (step 2)" in t.stdout, t.output


def test_resume_errors(saved, tmp_path):
    r = mpirun.train(2, *SMALL, "--resume", str(tmp_path / "none"), "--steps", "5", timeout=60)
    assert r.returncode == 2 and "no checkpoint there" in r.stderr, r.output
    other = [a if a != "32" else "64" for a in SMALL]  # another width
    r = mpirun.train(2, *other, "--resume", str(saved), "--steps", "5", timeout=60)
    assert r.returncode == 2, r.output
    assert "holds a model with --d-model 32, this run has --d-model 64" in r.stderr, r.output
    r = mpirun.train(1, *SMALL, "--resume", "auto", "--steps", "5", timeout=60)
    assert r.returncode == 2 and "--resume auto needs --checkpoint-dir" in r.stderr


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls not installed (Debian hdf5-tools)")
def test_h5ls_reads_the_shards(saved):
    shard = saved / "step_000003" / "shard_000.h5"
    r = subprocess.run(["h5ls", "-r", str(shard)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "/layers/1/attn/attn/qkv/w" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        ["h5dump", "-p", "-H", str(shard)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and 'ATTRIBUTE "sha256"' in r.stdout


def test_eval_and_generate(saved):
    r = mpirun.run(
        ["-m", "mpipipe", "eval", "--resume", str(saved), "--batches", "2"], n=2, timeout=60
    )
    assert r.returncode == 0 and "bits per byte" in r.stdout, r.output
    greedy = [
        "-m",
        "mpipipe",
        "generate",
        "--resume",
        str(saved),
        "--prompt",
        "def ",
        "--tokens",
        "20",
        "--temperature",
        "0",
    ]
    r = mpirun.run(greedy, n=2, timeout=60)
    one = mpirun.run(greedy, timeout=60)
    assert r.returncode == 0 and one.returncode == 0, r.output + one.output
    assert r.stdout.startswith("def ") and r.stdout == one.stdout  # greedy: same on any layout


@pytest.mark.openmpi  # signals to a rank under either launcher
@pytest.mark.parametrize("sig, ranks", [("SIGTERM", 2), ("SIGUSR1", 4)])
def test_preemption_saves_and_exits_75_for_a_requeue(tmp_path, sig, ranks):
    """SIGTERM/SIGUSR1 (the scheduler before the time limit): every rank finishes the step, the
    job saves and exits 75 (EX_TEMPFAIL), which jobs/train.sbatch requeues on."""
    d = tmp_path / f"ck-{sig}"
    job = Job(ranks, [*SMALL, "--steps", "100000", "--checkpoint-dir", str(d)], tmp_path)
    pids = job.pids()
    job.wait_for(r"step +1/")  # training, not starting up (see tests/test_faults.py for that)
    os.kill(max(pids), getattr(signal, sig))  # one rank only: the others learn of it
    assert job.finish() == 75, job.output()
    out = job.output()
    assert f"stopped by {sig}" in out and "--resume auto" in out
    stopped = (d / "latest").read_text().strip()
    step = int(stopped.split("_")[1])
    assert 0 < step < 100000
    r = mpirun.train(
        ranks,
        *SMALL,
        "--steps",
        str(step + 2),
        "--checkpoint-dir",
        str(d),
        "--resume",
        "auto",
        timeout=60,
    )
    assert r.returncode == 0 and f"resumed from {d / stopped}" in r.stdout, r.output


def test_a_checkpoint_written_before_the_rank_runtime_still_loads(tmp_path):
    """tests/data/checkpoint-2026-11-29 was saved by mpipipe as of commit 1b59073 (2 ranks, 2
    steps of the model below). Resuming it to step 3 must give exactly what 3 steps from scratch
    give today."""
    old = tmp_path / "old"
    shutil.copytree(mpirun.ROOT / "tests" / "data" / "checkpoint-2026-11-29", old)
    model = "--layers 2 --d-model 16 --heads 2 --seq-len 8 --global-batch 4 --microbatches 2"
    flags = [*model.split(), "--eval-batches", "1", "--steps", "3"]
    fresh, resumed = tmp_path / "fresh.jsonl", tmp_path / "resumed.jsonl"
    r = mpirun.train(2, *flags, "--metrics-file", str(fresh), timeout=60)
    assert r.returncode == 0, r.output
    more = ["--checkpoint-dir", str(old), "--resume", "auto", "--metrics-file", str(resumed)]
    r = mpirun.train(2, *flags, *more, timeout=60)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.output
    last = [json.loads(x)["loss"] for x in resumed.read_text().splitlines()]
    want = [json.loads(x)["loss"] for x in fresh.read_text().splitlines()]
    assert last == want[2:]


def test_a_tied_checkpoint_is_refused_untied_and_the_reverse(tmp_path):
    """The head of a tied checkpoint is the embedding: an untied run refuses it (and a tied run
    an untied one), naming the flag, rather than untying it silently."""
    from mpipipe.checkpoint.base import CheckpointError
    from mpipipe.checkpoint.read import check_model
    from mpipipe.model import gpt

    tied, untied = gpt(2, 32, 4, 16, tied=True), gpt(2, 32, 4, 16)
    for saved, run, flag in ((tied, untied, "yes"), (untied, tied, "no")):
        manifest = {"model": {"meta": saved.meta, "layers": [s.name for s in saved.layers]}}
        with pytest.raises(CheckpointError, match=f"pass --tie-embeddings {flag}"):
            check_model(tmp_path, manifest, run)
