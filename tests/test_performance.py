"""Stage balancing and activation recomputation: what they change and what they must not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from mpi4py import MPI

from mpipipe.config import TrainConfig
from mpipipe.job import finalize, prepare
from mpipipe.partition import balanced
from tests import mpirun


def _brute_force_best(costs, body, n):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        edges = [0, *cuts, len(costs)]
        parts = [range(a, b) for a, b in itertools.pairwise(edges)]
        if all(any(body[i] for i in r) for r in parts):
            worst = max(sum(costs[i] for i in r) for r in parts)
            best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize(
    "costs", [[1, 10, 10, 10, 10, 25], [30, 5, 5, 5, 5, 5, 5, 1], [2, 7, 3, 9, 4, 4, 8, 6, 12]]
)
def test_balanced_partition_is_optimal_and_contiguous(costs):
    body = [False] + [True] * (len(costs) - 2) + [False]  # embedding, blocks, head
    for n in range(1, len(costs) - 1):
        bounds = balanced(costs, body, n)
        assert [i for r in bounds for i in r] == list(range(len(costs)))
        assert all(any(body[i] for i in r) for r in bounds)
        assert max(sum(costs[i] for i in r) for r in bounds) == _brute_force_best(costs, body, n)


def test_embedding_and_head_costs_move_the_cuts():
    body = [False, True, True, True, True, False]
    assert balanced([0, 10, 10, 10, 10, 0], body, 2) == [range(0, 3), range(3, 6)]
    assert balanced([0, 10, 10, 10, 10, 25], body, 2) == [range(0, 4), range(4, 6)]
    assert balanced([25, 10, 10, 10, 10, 0], body, 2) == [range(0, 2), range(2, 6)]


def test_params_partition_uses_the_parameter_counts():
    job = prepare(TrainConfig(layers=4, d_model=64, heads=4, partition="params", pp=3), 3)
    params = [float(s.params) for s in job.model.layers]
    assert job.layer_costs == params
    assert job.bounds == balanced(params, [s.body for s in job.model.layers], 3)


def test_time_partition_measures_every_layer_once_per_recipe():
    job = finalize(
        prepare(TrainConfig(layers=4, d_model=32, heads=2, seq_len=32, partition="time", pp=2), 2),
        MPI.COMM_SELF,
    )
    t = job.layer_costs
    assert len(t) == 6 and all(x > 0 for x in t)
    assert t[1] == t[2] == t[3] == t[4]  # the blocks share one measurement
    assert job.bounds == balanced(t, [s.body for s in job.model.layers], 2)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "v.npz"
    names = [
        "recompute=none",
        "recompute=selective",
        "recompute=full",
        "partition=params",
        "partition=time",
    ]
    r = mpirun.run(["tests/scripts/variants.py", str(path), *names], n=2, timeout=240)
    assert r.returncode == 0, r.output
    return dict(np.load(path))


@pytest.mark.parametrize(
    "name", ["recompute=selective", "recompute=full", "partition=params", "partition=time"]
)
def test_variants_leave_results_bitwise_identical(variants, name):
    ref = {
        k.split("/", 1)[1]: v
        for k, v in variants.items()
        if k.startswith("recompute=none/") and "stash" not in k
    }
    got = {
        k.split("/", 1)[1]: v
        for k, v in variants.items()
        if k.startswith(name + "/") and "stash" not in k
    }
    assert sorted(got) == sorted(ref) and len(ref) > 20
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k


def test_recompute_lowers_activation_memory(variants):
    none = variants["recompute=none/stash_mb"]
    selective = variants["recompute=selective/stash_mb"]
    full = variants["recompute=full/stash_mb"]
    # stage 0 holds 2 micro-batches (1F1B); the last stage's peak is its head's weight-gradient
    # context (the logits' gradient), which recomputation does not touch
    assert (selective <= none).all() and (full <= none).all(), (none, selective, full)
    assert full[0] < selective[0] < none[0], (none, selective, full)
    assert full[0] < 0.6 * none[0] and max(full) < max(none), (none, full)
