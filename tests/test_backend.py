"""The GPU path's CPU-testable parts: backend choice, device placement, the CUDA-aware verdict,
staging device buffers through host memory (with a fake device), and `doctor`."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mpipipe import launch
from mpipipe.parallel.cuda_aware import verdict
from mpipipe.xp import pick_device, resolve_backend
from tests import mpirun

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_gpu_is_chosen_by_node_local_rank():
    assert [pick_device(r, 4, 4, False) for r in range(4)] == [0, 1, 2, 3]
    assert [pick_device(r, 8, 4, True) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="8 ranks on this node but 4 GPU.*--share-gpus yes"):
        pick_device(5, 8, 4, False)
    with pytest.raises(ValueError, match="no GPU is visible"):
        pick_device(0, 1, 0, True)


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here: these check its absence")
def test_auto_backend_without_cupy_is_numpy():
    assert resolve_backend("auto") == ("numpy", "auto: CuPy is not installed")
    assert resolve_backend("numpy")[0] == "numpy"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resolve_backend("tpu")


def test_cuda_aware_verdict_evidence_order():
    unknown = (None, "no query")
    assert verdict("yes", {}, unknown) == (True, "--cuda-aware yes")
    assert verdict("no", {"MPIPIPE_CUDA_AWARE": "yes"}, (True, "q"))[0] is False
    assert verdict("auto", {"MPIPIPE_CUDA_AWARE": "yes"}, (False, "q")) == (
        True,
        "MPIPIPE_CUDA_AWARE=yes",
    )
    assert verdict("auto", {}, (True, "MPIX_GPU_query_support(CUDA) = 1"))[0] is True
    assert verdict("auto", {"MPICH_GPU_SUPPORT_ENABLED": "1"}, unknown)[0] is True
    aware, why = verdict("auto", {}, unknown)
    assert aware is False and why.startswith("unknown, treated as not CUDA-aware")


def test_the_pypi_mpich_is_not_cuda_aware():
    aware, why = verdict("auto", {})
    assert aware is False and "MPI library" in why, why


def test_staging_through_host_buffers_with_a_fake_device():
    r = mpirun.run(["tests/scripts/staging.py"], n=2, timeout=60)
    assert r.returncode == 0, r.output
    # 3 x 3 buffers + ping-pong, one copy each; then 4 device collectives (reduce-scatter,
    # all-gather, waited later and at once), each a copy to the host and one back
    assert "ok copies [19, 19]" in r.stdout, r.output


def test_doctor_reports_library_verdict_and_devices():
    r = mpirun.run(["-m", "mpipipe", "doctor"], n=2, timeout=60)
    assert r.returncode == 0, r.output
    assert "\0" not in r.stdout  # Open MPI's version string carries its C terminator
    library = r.stdout.splitlines()[0]
    assert library.startswith(("MPI library: MPICH", "MPI library: Open MPI")), library
    assert launch.family(library) == launch.family(launch.library_version()), library
    assert "CUDA-aware: no: the MPI library says so" in r.stdout
    assert r.stdout.count(" cpu") == 2


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here: these check its absence")
@pytest.mark.parametrize("ranks", [1, 2])
def test_cupy_backend_without_cupy_is_a_clear_error(ranks):
    r = mpirun.train(ranks, "--backend", "cupy", "--steps", "1", timeout=60)
    assert r.returncode == 2, r.output
    assert "--backend cupy needs CuPy and a GPU (pip install 'mpipipe[cuda12]'" in r.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_equals_add_at_bit_for_bit(dtype):
    """The embedding's gradient: NumPy's scatter_add takes rounds of distinct indices and an
    add.accumulate for the most repeated ones (xp._add_at), and must give add.at's bits: skewed
    index counts (a text's bytes), a target that already holds sums, negative and 2-D indices."""
    from mpipipe.xp import scatter_add

    rng = np.random.default_rng(0)
    for _ in range(30):
        v, n, c = int(rng.integers(1, 60)), int(rng.integers(1, 3000)), int(rng.integers(1, 40))
        index = rng.choice(v, size=n, p=rng.dirichlet(np.full(v, rng.uniform(0.05, 2))))
        values = (rng.standard_normal((n, c)) * rng.uniform(0.1, 100)).astype(dtype)
        start = rng.standard_normal((v, c)).astype(dtype)
        want = start.copy()
        np.add.at(want, index, values)
        got = start.copy()
        scatter_add(got, index, values)
        np.testing.assert_array_equal(got, want)
    # negative indices (the row from the end, as add.at takes them) and a 2-D index
    index, values = np.r_[np.arange(8), -1, 7, -1], np.ones((11, 3), dtype)
    for idx in (index, index.reshape(1, -1)):
        want, got = np.zeros((8, 3), dtype), np.zeros((8, 3), dtype)
        np.add.at(want, idx, values)
        scatter_add(got, idx, values)
        np.testing.assert_array_equal(got, want)
