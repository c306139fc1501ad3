"""pp x dp: the same global batch gives the single-process result; layouts; overlap; errors.

With dp > 1 the gradient of the mean loss is summed over replicas in another order than in one
process, so equality is to rounding (relative 1e-12 in float64), not bitwise. The comparison uses
SGD: Adam's first steps are sign-like (m / sqrt(v)), which turns the rounding noise of gradients
that are mathematically zero (the attention key bias: softmax ignores a constant per row) into
full-size updates of either sign, for any change of summation order, data-parallel or not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import mpirun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    out = {}
    for pp, dp in [(1, 1), (1, 2), (2, 2), (4, 2), (2, 4)]:
        path = tmp / f"pp{pp}dp{dp}.npz"
        r = mpirun.run(
            ["tests/scripts/data_parallel.py", str(path), str(pp), "gpipe", "1f1b"],
            n=None if pp * dp == 1 else pp * dp,
            timeout=240,
        )
        assert r.returncode == 0, r.output
        out[(pp, dp)] = dict(np.load(path))
    return out


@pytest.mark.parametrize("pp, dp", [(1, 2), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_grid_equals_single_process(runs, pp, dp, name):
    ref, got = runs[(1, 1)], runs[(pp, dp)]
    keys = sorted(k[len(name) + 1 :] for k in ref if k.startswith(f"{name}/"))
    assert keys == sorted(k[len(name) + 1 :] for k in got if k.startswith(f"{name}/"))
    assert len([k for k in keys if k.startswith("layers.")]) > 20
    for k in keys:
        a, b = got[f"{name}/{k}"], ref[f"{name}/{k}"]
        rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
        assert rel < 1e-12, f"{k}: relative difference {rel:.3g}"
    assert not np.array_equal(ref[f"{name}/loss"][:1], ref[f"{name}/loss"][-1:])  # it trained


def test_replicas_stay_identical(tmp_path):
    """Every replica ends with the same parameters (they all apply the same reduced gradient)."""
    script = tmp_path / "replicas.py"
    script.write_text(
        "import io\nimport numpy as np\nfrom mpi4py import MPI\n"
        "from mpipipe import TrainConfig, train\n"
        "cfg = TrainConfig(layers=2, d_model=32, heads=4, seq_len=16, global_batch=8,\n"
        "                  microbatches=2, steps=3, pp=2, eval_batches=1)\n"
        "r = train(cfg, out=io.StringIO())\n"
        "allp = MPI.COMM_WORLD.allgather(r.params)\n"
        "me = MPI.COMM_WORLD.rank\n"
        "for other in allp:\n"
        "    if other.keys() == r.params.keys() and other is not allp[me]:\n"
        "        assert all(np.array_equal(other[k], r.params[k]) for k in other)\n"
        "print('ok', me)\n"
    )
    r = mpirun.run([str(script)], n=4, timeout=120)
    assert r.returncode == 0 and r.stdout.count("ok") == 4, r.output


def test_sixteen_ranks_default_layout():
    r = mpirun.train(16, "--steps", "5", "--eval-batches", "1", timeout=300)
    assert r.returncode == 0, r.output
    assert "pp=4 x dp=4" in r.stdout and "done: 5 steps" in r.stdout
    assert "stage 3: ranks 12@" in r.stdout  # dp contiguous: ranks 12..15 hold stage 3


SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1", "zbv"]


@pytest.mark.parametrize("pp, dp", [(4, 4), (8, 2), (2, 8)])
def test_sixteen_ranks_every_schedule(pp, dp):
    for name in SCHEDULES:
        r = mpirun.train(
            16,
            "--pp",
            str(pp),
            "--layers",
            "16",
            "--d-model",
            "32",
            "--heads",
            "2",
            "--seq-len",
            "16",
            "--microbatches",
            str(pp),
            "--global-batch",
            str(pp * dp),
            "--schedule",
            name,
            "--steps",
            "2",
            "--eval-batches",
            "1",
            "--rank-order",
            "pp" if pp == 8 else "dp",
            timeout=180,
        )
        assert r.returncode == 0, f"{name} pp={pp} dp={dp}\n{r.output}"
        assert f"pp={pp} x dp={dp}" in r.stdout and "done: 2 steps" in r.stdout


def test_overlap_hides_the_all_reduce(tmp_path):
    """With emulated compute (so the machine's 2 cores are free for MPI), the time the slowest
    rank waits for its gradient buckets after its last backward action is smaller when each
    bucket starts as soon as its layers are final than when all start after backward ends."""
    exposed = {}
    for mode in ("on", "off"):
        metrics = tmp_path / f"{mode}.jsonl"
        r = mpirun.train(
            4,
            "--layers",
            "8",
            "--d-model",
            "512",
            "--heads",
            "8",
            "--pp",
            "2",
            "--steps",
            "6",
            "--emulate",
            "F=1.25,B=1.25,W=5",
            "--bucket-mb",
            "13",
            "--overlap",
            mode,
            "--eval-batches",
            "1",
            "--metrics-file",
            str(metrics),
            timeout=180,
        )
        assert r.returncode == 0, r.output
        recs = [json.loads(line) for line in metrics.read_text().splitlines()][1:]
        exposed[mode] = float(np.median([x["allreduce_exposed_s"] for x in recs]))
    assert exposed["on"] < exposed["off"], exposed


@pytest.mark.parametrize(
    "ranks, flags, message",
    [
        (4, ["--pp", "2", "--dp", "3"], "--pp 2 x --dp 3 = 6 but 4 ranks were launched"),
        (4, ["--dp", "3"], "world size 4 is not a multiple of --dp 3"),
        (
            4,
            ["--dp", "4", "--global-batch", "8"],
            "--global-batch 8 does not split into --dp 4 replicas x --microbatches 4",
        ),
        (1, ["--pp", "1", "--dp", "2"], "--pp 1 x --dp 2 = 2 but 1 rank was launched"),
    ],
)
def test_grid_errors(ranks, flags, message):
    r = mpirun.train(ranks, *flags, "--steps", "1", timeout=60)
    assert r.returncode == 2, r.output
    assert message in r.stderr and r.stderr.count("mpipipe: error:") == 1, r.stderr
