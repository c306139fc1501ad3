"""The GPU path, whole runs, on CPUs: every configuration below trains on the strict fake CuPy
(tests/fakegpu: device arrays refuse implicit host conversion, MPI refuses them unless it is
CUDA-aware, stream races raise) and must give the NumPy backend's numbers bit for bit, since the
fake computes with NumPy underneath. A CUDA-aware MPI is modelled with FAKE_CUPY_MPI_AWARE=1 and
`--cuda-aware yes`; otherwise every device buffer must be staged through host memory."""

from __future__ import annotations

import json
import os

import pytest

from tests import mpirun

FAKE = {"PYTHONPATH": f"{mpirun.ROOT / 'tests' / 'fakegpu'}{os.pathsep}{mpirun.ROOT}"}
BASE = [
    *("--layers 4 --d-model 16 --heads 2 --seq-len 8 --global-batch 8 --microbatches 4".split()),
    *("--eval-batches 1 --eval-every 2 --steps 3 --dtype float64 --peak-tflops 1".split()),
    *("--timeout-s 20 --log-every 100".split()),
]
STAGED = ["--backend", "cupy", "--share-gpus", "yes", "--cuda-aware", "no"]
AWARE = ["--backend", "cupy", "--share-gpus", "yes", "--cuda-aware", "yes"]


def numbers(path):
    """What must match: per step the loss, the gradient norm and the eval loss."""
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in recs]


def run(tmp_path, name, n, *flags, aware=False):
    m = tmp_path / f"{name}.jsonl"
    env = {**FAKE, "FAKE_CUPY_MPI_AWARE": "1" if aware else "0"}
    r = mpirun.train(n, *BASE, *flags, "--metrics-file", str(m), timeout=120, **env)
    assert r.returncode == 0, r.output
    return numbers(m), r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process NumPy run every layout and schedule must reproduce."""
    m = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    r = mpirun.train(None, *BASE, "--backend", "numpy", "--metrics-file", str(m), timeout=120)
    assert r.returncode == 0, r.output
    return numbers(m)


@pytest.mark.parametrize(
    "name, n, flags, aware",
    [
        ("pp2-1f1b-staged", 2, ["--pp", "2", *STAGED], False),
        ("pp2-gpipe-staged", 2, ["--pp", "2", "--schedule", "gpipe", *STAGED], False),
        ("pp2-interleaved-staged", 2, ["--pp", "2", "--schedule", "interleaved", *STAGED], False),
        ("pp2-zbh1-staged", 2, ["--pp", "2", "--schedule", "zb-h1", *STAGED], False),
        ("pp2-zbv-staged", 2, ["--pp", "2", "--schedule", "zbv", *STAGED], False),
        pytest.param(
            "pp2xdp2-staged",
            4,
            ["--pp", "2", "--dp", "2", *STAGED],
            False,
            marks=pytest.mark.openmpi,  # pinned host buffers, not CUDA-aware
        ),
        ("pp2xdp2-staged-recompute", 4, ["--pp", "2", "--recompute", "full", *STAGED], False),
        pytest.param(
            "pp2-aware",
            2,
            ["--pp", "2", *AWARE],
            True,
            marks=pytest.mark.openmpi,  # device buffers handed to MPI
        ),
        ("pp2xdp2-aware-selective", 4, ["--pp", "2", "--recompute", "selective", *AWARE], True),
    ],
)
def test_layouts_on_the_fake_gpu_equal_numpy_bitwise(tmp_path, reference, name, n, flags, aware):
    """Pipelines equal the single process bitwise; with dp > 1 the replicas' sum is rounded
    differently from one process's accumulation, so those equal NumPy on the same layout."""
    got, _ = run(tmp_path, name, n, *flags, aware=aware)
    if n == 4:
        layout = flags[: flags.index("--backend")]
        reference, _ = run(tmp_path, f"{name}-numpy", n, *layout, "--backend", "numpy")
    assert got == reference, (name, got, reference)


def test_dry_run_names_the_device_transport_policy():
    for aware, policy in (("no", "staged"), ("yes", "direct")):
        flags = [*BASE, "--pp", "2", "--dry-run", "--backend", "cupy", "--share-gpus", "yes"]
        flags += ["--cuda-aware", aware]
        r = mpirun.train(2, *flags, timeout=60, **FAKE)
        assert r.returncode == 0, r.output
        assert f"transport: device buffers {policy}" in r.stdout, r.stdout


def test_fp16_on_the_fake_gpu_equals_numpy_fp16(tmp_path):
    flags = ["--pp", "2", "--dp", "2", "--dtype", "fp16"]
    host, _ = run(tmp_path, "fp16-numpy", 4, *flags, "--backend", "numpy")
    dev, _ = run(tmp_path, "fp16-fake", 4, *flags, *STAGED)
    assert dev == host


def test_checkpoint_resume_eval_and_generate_on_the_fake_gpu(tmp_path, reference):
    """Save on 2 staged ranks, resume on one (another layout), eval and generate from it: all on
    the device the training used."""
    ck = tmp_path / "ck"
    flags = ["--steps", "2", "--checkpoint-dir", str(ck), "--pp", "2", *STAGED]
    first, _ = run(tmp_path, "first", 2, *flags)
    assert first == reference[:2]
    more = ["--steps", "3", "--checkpoint-dir", str(ck), "--resume", "auto", *STAGED]
    rest, r = run(tmp_path, "rest", None, *more)
    assert "resumed from" in r.stdout and rest == reference[2:], (rest, reference)
    ev = mpirun.run(["-m", "mpipipe", "eval", "--resume", str(ck), "--batches", "1"], n=2,
                    timeout=60, **FAKE)  # fmt: skip
    assert ev.returncode == 0 and "bits per byte" in ev.stdout, ev.output
    gen = ["-m", "mpipipe", "generate", "--resume", str(ck), "--tokens", "5", "--seed", "1"]
    g = mpirun.run(gen, n=2, timeout=60, **FAKE)
    assert g.returncode == 0, g.output


def test_time_partition_mfu_and_trace_on_the_fake_gpu(tmp_path):
    """The profiler and the MFU reference time on the device's clock (CUDA events), and the
    trace is written, on the fake GPU."""
    trace = tmp_path / "t.json"
    flags = ["--pp", "2", "--partition", "time", "--peak-tflops", "0", "--trace", str(trace)]
    _, r = run(tmp_path, "time", 2, *flags, *STAGED)
    assert "ms)" in r.stdout and "MFU" in r.stdout, r.stdout  # stage times in the layout line
    assert json.loads(trace.read_text())["traceEvents"]


def test_host_synchronisations_per_step_do_not_grow_with_layers_or_micro_batches():
    r = mpirun.run(["tests/scripts/device_syncs.py"], timeout=240, **FAKE)
    assert r.returncode == 0, r.output
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    counts = {row["host_syncs_per_step"] for row in rows}
    assert counts == {2.0}, rows  # the step's losses and its gradient norms: one transfer each


def test_doctor_names_cupy_cuda_and_each_ranks_gpu():
    r = mpirun.run(["-m", "mpipipe", "doctor"], n=2, timeout=60, **FAKE, FAKE_CUPY_DEVICES="2")
    assert r.returncode == 0, r.output
    assert "CuPy 13.6.0+fake, CUDA runtime" in r.stdout and ", driver " in r.stdout, r.stdout
    assert "cuda:0 (Fake GPU)" in r.stdout and "cuda:1 (Fake GPU)" in r.stdout, r.stdout
