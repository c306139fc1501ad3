"""THE claim: a pipelined run's losses and parameters equal the single-process run's, bitwise.

Three optimizer steps of a small GPT (8 layers) with every schedule on 2 and 4 ranks, in float64
and float32, each against the same config run as one plain process (pp=1, 1F1B, no
communication). Gradients accumulate in increasing micro-batch order in every schedule and the
global norm is summed in layer order, so nothing may differ in the last bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import mpirun

# CI's Open MPI pass runs the schedules marked `openmpi`: one per shape of message traffic (one
# chunk per rank; chunks looping from the last rank back to the first; the V, whose turn stays
# on the last rank; DualPipeV's two directions at once). The others send the same kinds of
# messages in other orders, which both MPI libraries match by the same rule (MPI's non-overtaking
# order on one communicator and tag), checked under MPICH in pass 1.
OPENMPI = pytest.mark.openmpi
SCHEDULES = [
    "gpipe",
    pytest.param("1f1b", marks=OPENMPI),
    pytest.param("interleaved", marks=OPENMPI),
    "zb-h1",
    pytest.param("zbv", marks=OPENMPI),
    "v-half",
    "v-min",
    pytest.param("dualpipev@8", marks=OPENMPI),
    "auto@8",  # the synthesized schedule (tests/scripts/transparency.py: --memory 1.5)
]
NAMES = [s if isinstance(s, str) else s.values[0] for s in SCHEDULES]


def reference(name: str) -> str:
    """The single-process run with the same micro-batches: 'NAME@M' runs M, not 4."""
    return "1f1b@" + name.split("@")[1] if "@" in name else "1f1b"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Every schedule on 2 and 4 ranks, and the references on one: those the selected tests
    read (tests/mpirun.py: selected)."""
    tmp = tmp_path_factory.mktemp("transparency")
    tests = {
        "test_pipeline_equals_single_process_bitwise",
        "test_measured_peak_stash_equals_the_checker",
    }
    pps, wanted = mpirun.selected(request, "pp", tests), mpirun.selected(request, "name", tests)
    out = {}
    for pp in (1, 2, 4):
        if pp > 1 and pps is not None and pp not in pps:
            continue
        path = tmp / f"pp{pp}.npz"
        names = [n for n in NAMES if wanted is None or n in wanted]
        if pp == 1:
            names = ["1f1b", "gpipe", "1f1b@8"]
        r = mpirun.run(
            ["tests/scripts/transparency.py", str(path), *names],
            n=None if pp == 1 else pp,
            timeout=240,
        )
        assert r.returncode == 0, r.output
        out[pp] = dict(np.load(path))
    return out


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pipeline_equals_single_process_bitwise(runs, pp, name, dtype):
    ref, got, base = runs[1], runs[pp], reference(name)
    ref_keys = sorted(
        k[len(f"{base}/{dtype}/") :] for k in ref if k.startswith(f"{base}/{dtype}/")
    )
    got_keys = sorted(
        k[len(f"{name}/{dtype}/") :] for k in got if k.startswith(f"{name}/{dtype}/")
    )
    assert got_keys == ref_keys
    assert len([k for k in ref_keys if k.startswith("layers.")]) > 40  # every parameter
    for k in ref_keys:
        a, b = got[f"{name}/{dtype}/{k}"], ref[f"{base}/{dtype}/{k}"]
        assert a.dtype == b.dtype, k
        diff = np.abs(a.astype(float) - b.astype(float)).max()
        assert np.array_equal(a, b), f"{k} differs (max |diff| {diff:.3g})"


def test_training_moved_the_parameters(runs):
    """Guard against a vacuous equality: the reference really trained."""
    losses = runs[1]["1f1b/float64/loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_single_process_schedules_agree(runs):
    ref = runs[1]
    for k in ref:
        if k.startswith("gpipe/"):
            assert np.array_equal(ref[k], ref["1f1b/" + k[len("gpipe/") :]]), k


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name", SCHEDULES)
def test_measured_peak_stash_equals_the_checker(runs, pp, name):
    measured = runs[pp][f"peak/{name}/measured"]
    predicted = runs[pp][f"peak/{name}/predicted"]
    assert len(measured) == pp
    assert measured.tolist() == predicted.tolist()
