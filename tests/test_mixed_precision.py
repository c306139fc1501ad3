"""fp16 training (CPU-testable: NumPy has float16): fp32 master weights and optimizer state,
dynamic loss scaling with skipped steps counted, activations crossing MPI in fp16."""

from __future__ import annotations

import json

import h5py
import numpy as np

from tests import mpirun

FLAGS = [*mpirun.TINY, "--layers", "2", "--eval-every", "0"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fp16_trains_close_to_fp32(tmp_path):
    runs = {}
    for dtype in ("fp16", "float32"):
        m = tmp_path / f"{dtype}.jsonl"
        r = mpirun.train(
            2, *FLAGS, "--dtype", dtype, "--steps", "15", "--metrics-file", str(m), timeout=120
        )
        assert r.returncode == 0, r.output
        runs[dtype] = records(m)
    half, full = runs["fp16"], runs["float32"]
    assert half[-1]["loss"] < half[0]["loss"] - 0.5  # it learns
    assert abs(half[-1]["loss"] - full[-1]["loss"]) < 0.05, (half[-1]["loss"], full[-1]["loss"])
    assert all(r["skipped_steps"] == 0 and r["loss_scale"] == 2.0**15 for r in half)


def test_overflow_skips_steps_and_halves_the_scale(tmp_path):
    m = tmp_path / "m.jsonl"
    r = mpirun.train(
        2,
        *FLAGS,
        "--dtype",
        "fp16",
        "--loss-scale",
        str(2.0**40),
        "--steps",
        "40",
        "--metrics-file",
        str(m),
        timeout=120,
    )
    assert r.returncode == 0, r.output
    recs = records(m)
    skipped = recs[-1]["skipped_steps"]
    assert 5 <= skipped < 40, skipped  # the scale came down until gradients fit in fp16
    assert recs[skipped]["loss_scale"] == 2.0 ** (40 - skipped)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3  # and then it learned


def test_fp16_checkpoint_holds_fp32_masters_and_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = [*FLAGS, "--dtype", "fp16"]
    for d, steps, extra in [
        (straight, "6", []),
        (split, "3", []),
        (split, "6", ["--resume", "auto"]),
    ]:
        r = mpirun.train(
            2, *base, "--steps", steps, "--checkpoint-dir", str(d), *extra, timeout=120
        )
        assert r.returncode == 0, r.output
    with h5py.File(straight / "step_000006" / "shard_000.h5", "r") as f:
        assert f["layers/1/attn/attn/qkv/w"].dtype == np.float16  # the compute copy
        assert f["optim/master/1/attn/attn/qkv/w"].dtype == np.float32
        a = {k: f[k][...] for k in ("optim/master/1/attn/attn/qkv/w", "optim/m/1/mlp/mlp/fc/w")}
    with h5py.File(split / "step_000006" / "shard_000.h5", "r") as f:
        for k, v in a.items():
            assert np.array_equal(f[k][...], v), k
