"""The command line on real MPI jobs: bad input, a failing rank, the default training, 16 ranks.

Every launch has a timeout (tests/mpirun.py) that kills all ranks, so a hang fails fast.
"""

from __future__ import annotations

import json

import pytest

from tests import mpirun

SMALL = mpirun.TINY


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "tiny.txt"
    f.write_text("hello pipeline " * 10)  # 150 bytes
    return str(f)


BAD = {
    "more stages than layers": (
        ["--layers", "2", "--pp", "4"],
        "4 pipeline stages but the model has only 2 layers (use --pp <= 2, or --layers >= 4)",
    ),
    "micro-batches don't divide": (
        ["--microbatches", "6"],
        "--microbatches 6 does not divide --global-batch 32 (choose a divisor of 32, e.g. 4)",
    ),
    "world size not a multiple of pp": (["--pp", "3"], "is not a multiple of --pp 3"),
    "unknown schedule": (
        ["--schedule", "zigzag"],
        "--schedule 'zigzag' is not one of: 1f1b, dualpipev, gpipe, interleaved, v-half, v-min, "
        "zb-h1, zbv",
    ),
    "missing data path": (
        ["--data", "/no/such/corpus.txt"],
        "--data /no/such/corpus.txt: no such file, folder or matching glob",
    ),
    "sequence longer than the data": (
        ["--data", "TINY", "--seq-len", "128"],
        "--seq-len 128 is larger than the data allows",
    ),
    "unknown flag": (["--layerz", "3"], "unrecognized arguments: --layerz 3"),
}


@pytest.mark.parametrize("ranks", [1, 4])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_fast_with_one_clear_message(case, ranks, tiny_text):
    flags, message = BAD[case]
    flags = [tiny_text if f == "TINY" else f for f in flags]
    if case == "world size not a multiple of pp" and ranks == 1:
        flags = ["--pp", "3", "--layers", "4"]  # 1 rank, 3 stages wanted
    r = mpirun.train(ranks, *flags, "--steps", "1", timeout=60)
    assert r.returncode != 0, r.output
    assert r.stderr.count("mpipipe: error:") == 1, r.stderr  # printed once, by rank 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert "step 1/" not in r.stdout  # no training started
    assert r.seconds < 30


@pytest.mark.openmpi  # the launcher ends every rank when one raises
@pytest.mark.parametrize("grid", [["--pp", "4"], ["--pp", "2", "--dp", "2"]])
def test_a_rank_that_raises_ends_the_whole_job(grid):
    flags = [*SMALL, *grid, "--steps", "50", "--inject-fault", "raise@2:3"]
    r = mpirun.train(4, *flags, timeout=60)
    assert r.returncode != 0
    assert r.stderr.count("fault injected on rank 2 at step 3") == 1, r.stderr
    assert r.stderr.count("Traceback") == 1, r.stderr
    assert "step 50/50" not in r.stdout
    assert r.seconds < 30


def test_single_process_and_metrics_file(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = mpirun.train(
        None,
        *SMALL,
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--metrics-file",
        str(metrics),
        "--model",
        "mlp",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        timeout=60,
    )
    assert r.returncode == 0, r.output
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    for rec in recs:
        assert {"step", "loss", "tokens_per_s", "step_time_s"} <= set(rec)
    assert "eval_loss" in recs[1] and "eval_loss" in recs[3] and "eval_loss" not in recs[0]
    assert r.stdout.count("step ") >= 4 and "done: 4 steps" in r.stdout


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[train]\nlayers = 2\nd-model = 32\nheads = 2\nseq-len = 16\n"
        'global-batch = 8\nmicrobatches = 2\nsteps = 50\nschedule = "gpipe"\n'
    )
    r = mpirun.train(2, "--config", str(cfg), "--steps", "2", "--eval-batches", "1", timeout=60)
    assert r.returncode == 0, r.output
    assert "pp=2 x dp=1 (dp contiguous), schedule gpipe, 2 micro-batches of 4" in r.stdout
    assert "done: 2 steps" in r.stdout  # the flag beat the file's 50


@pytest.mark.timeout(360)  # past mpirun's own 300 s, so a slow run fails alone, with its output
def test_default_training_learns_on_four_ranks(tmp_path):
    """`mpiexec -n 4 python -m mpipipe train` with its defaults: from ~ln(256) to below 2.2 nats
    (the corpus's byte-bigram entropy is about 2.4, so this needs context), within 5 minutes."""
    metrics = tmp_path / "default.jsonl"
    r = mpirun.train(4, "--metrics-file", str(metrics), timeout=300)
    assert r.returncode == 0, r.output
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert recs[0]["loss"] > 5.0
    tail = [x["loss"] for x in recs[-10:]]
    assert sum(tail) / len(tail) < 2.2, tail  # the last 10 steps, not one lucky batch
    evals = [x["eval_loss"] for x in recs if "eval_loss" in x]
    assert len(evals) >= 2 and evals[-1] < evals[0] and evals[-1] < 2.2, evals
    assert r.seconds < 300
