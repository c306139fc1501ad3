"""The strict fake CuPy (tests/fakegpu): it refuses what CuPy refuses, counts host traffic, and
raises HazardError where a GPU would race; mpipipe's GPU path runs on it bitwise like NumPy.

In-process tests load the fake under its package path (tests.fakegpu.cupy), so no module named
`cupy` appears for other tests; whole programs get it as mpipipe would: PYTHONPATH=FAKE_PATH.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import numpy as np
import pytest

from mpipipe.parallel.staging import CupyOps
from tests import mpirun

FAKE_PATH = f"{mpirun.ROOT / 'tests' / 'fakegpu'}{os.pathsep}{mpirun.ROOT}"
# a model small enough for many launches; the watchdog ends a deadlocked run in seconds
TINY = "--layers 2 --d-model 16 --heads 2 --seq-len 8 --global-batch 4 --microbatches 2".split()
TINY += "--eval-batches 1 --steps 2 --dtype float64 --peak-tflops 1 --timeout-s 10".split()


FAKE = importlib.import_module("tests.fakegpu.cupy")
assert "cupy" not in sys.modules  # other test modules still see no CuPy


@pytest.fixture
def cp() -> Any:
    return FAKE


@pytest.fixture
def counts(cp: Any) -> dict[str, int]:
    cp._fake.reset()
    return cp._fake.counts


class Ops(CupyOps):
    """mpipipe's copy engine, unchanged, on the fake loaded under its package path."""

    def __init__(self, cp: Any) -> None:
        self.cupy, self.device = cp, cp.cuda.Device()
        self.compute, self.stream = cp.cuda.get_current_stream(), cp.cuda.Stream(non_blocking=True)
        self.cupyx = importlib.import_module("tests.fakegpu.cupyx")

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self.cupyx.empty_pinned(shape, dtype)


def poll(ops: Ops, event: Any) -> list[bool]:
    return [ops.done(event) for _ in range(ops.cupy._fake.DELAY)]


# -- the wall between host and device -------------------------------------------------------------
def test_implicit_conversion_to_host_is_refused(cp):
    x = cp.arange(6.0)
    implicit = "Implicit conversion to a NumPy array is not allowed"
    for convert in (np.asarray, np.array, lambda a: np.array([a, a]), np.from_dlpack):
        with pytest.raises((TypeError, BufferError), match=f"{implicit}|not CUDA-aware"):
            convert(x)
    with pytest.raises(TypeError, match="bytes-like"):
        memoryview(x)  # no buffer protocol either
    host = np.zeros(6)
    with pytest.raises(TypeError, match=implicit):
        host[...] = x


def test_mixing_host_and_device_arrays_is_refused(cp):
    x, host = cp.arange(4.0), np.ones(4)
    for mix in (
        lambda: x + host,
        lambda: host + x,
        lambda: cp.add(x, host),
        lambda: x @ host,
        lambda: x + np.array(1.0),  # CuPy takes NumPy scalars, not 0-d arrays
        lambda: cp.einsum("i,i->", x, host),
    ):
        with pytest.raises(TypeError, match="host array"):
            mix()
    with pytest.raises(TypeError) as refused:  # CuPy: ValueError from fill(); it is both
        x[...] = host
    assert isinstance(refused.value, ValueError)
    x += np.float32(2.0)
    x[1] = np.float64(7.0)
    assert x.get().tolist() == [2.0, 7.0, 4.0, 5.0]


def test_views_share_memory_and_in_place_operators_mutate(cp):
    a = cp.arange(12.0)
    v = a[2:5]
    v += 1.0
    v *= 2.0
    v -= 1.0
    m = a.reshape(3, 4)
    m.T[0] *= 10.0  # column 0 of the (3, 4) view: a[0], a[4], a[8]
    a.reshape(2, 6).swapaxes(0, 1)[5] = -1.0  # a[5] and a[11]
    a.view(np.int64)[3] = 0  # the bytes of a[3]: 0.0
    want = np.arange(12.0)
    want[2:5] = (want[2:5] + 1) * 2 - 1
    want[[0, 4, 8]] *= 10
    want[[5, 11]] = -1
    want[3] = 0.0
    assert np.array_equal(a.get(), want)
    assert v.base is a and m.base is a and a.base is None and a.T.base is a
    attrs = (a.shape, a.ndim, a.size, a.nbytes, a.itemsize, a.strides, a.dtype)
    assert attrs == ((12,), 1, 12, 96, 8, (8,), np.float64)
    assert m.flags.c_contiguous and not m.T.flags.c_contiguous and len(m) == 3
    assert isinstance(-v, cp.ndarray) and isinstance(v**2 @ v, cp.ndarray)
    assert (v > 5.0).get().tolist() == [False, False, True]  # v is a[2:5] = 5, 0, 9


def test_fancy_indexing_and_scatter_add_accumulate(cp):
    cupyx = importlib.import_module("tests.fakegpu.cupyx")
    table = cp.arange(10.0).reshape(5, 2)
    idx = cp.asarray([4, 0, 4])
    assert table[idx].get().tolist() == [[8, 9], [0, 1], [8, 9]]
    rows, cols = cp.arange(3), cp.asarray([1, 0, 1])
    assert table[rows, cols].get().tolist() == [1.0, 2.0, 5.0]
    table[rows, cols] -= 1.0
    grad = cp.zeros((5, 2))
    cp.add.at(grad, idx, cp.ones((3, 2)))
    cupyx.scatter_add(grad, idx, cp.ones((3, 2)))
    assert grad.get()[:, 0].tolist() == [2.0, 0.0, 0.0, 0.0, 4.0]
    with pytest.raises(TypeError, match="scatter_add only supports"):  # CuPy's atomicAdd types
        cp.add.at(cp.zeros(5, dtype=np.int64), idx, 1)


def test_counters_count_host_traffic(cp, counts):
    x = cp.asarray(np.arange(4.0))  # host -> device
    assert (counts["h2d_copies"], counts["h2d_bytes"], counts["host_syncs"]) == (1, 32, 0)
    total = float(x.sum())  # a blocking read of 8 bytes
    assert total == 6.0 and (counts["host_syncs"], counts["d2h_bytes"]) == (1, 8)
    for read in (lambda: x.get(), lambda: cp.asnumpy(x), lambda: int(x[1]), lambda: bool(x[2])):
        read()
    x[3].item(), x.tolist()
    assert (counts["host_syncs"], counts["d2h_copies"]) == (7, 7)
    stream = cp.cuda.Stream(non_blocking=True)
    stream.synchronize()
    stream.record().synchronize()
    cp.cuda.Device().synchronize()
    assert counts["host_syncs"] == 10
    importlib.import_module("tests.fakegpu.cupyx").empty_pinned((4,), np.float64)
    stream.wait_event(cp.cuda.get_current_stream().record())
    x.get(stream=stream, out=np.empty(4), blocking=False)  # asynchronous into pageable memory
    pinned = (counts["pinned_allocs"], counts["pinned_bytes"], counts["pageable_async_copies"])
    assert pinned == (1, 32, 1) and cp._fake.snapshot() == counts
    cp._fake.reset()
    assert set(cp._fake.snapshot().values()) == {0}


def test_cuda_runtime_and_devices(cp):
    assert cp.cuda.runtime.getDeviceCount() == 1
    assert cp.cuda.runtime.getDeviceProperties(0)["name"] == b"Fake GPU"
    assert cp.cuda.runtime.runtimeGetVersion() >= 12000 and cp.cuda.runtime.driverGetVersion()
    with cp.cuda.Device(0) as dev:
        assert dev.id == 0 and dev.compute_capability == "90"
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="invalid device ordinal"):
        cp.cuda.Device(1).use()
    side = cp.cuda.Stream(non_blocking=True)
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null
    with side:
        assert cp.cuda.get_current_stream() is side
    assert cp.cuda.Event().done  # never recorded: done, as in CUDA


# -- the stream rules, on mpipipe's own copy engine ---------------------------------------------
def test_send_copy_after_the_compute_is_safe_and_lands_after_polls(cp):
    ops = Ops(cp)
    y = cp.arange(6.0).reshape(2, 3) * 2.0  # produced by a kernel just queued
    host = ops.host_buffer(y.shape, y.dtype)
    host[...] = 0.0
    event = ops.to_host(y, host, ops.mark())  # record, side waits, copy, record
    assert poll(ops, event) == [False] * (cp._fake.DELAY - 1) + [True]
    assert np.array_equal(host, np.arange(6.0).reshape(2, 3) * 2)
    y += 1.0  # the copy has run: reusing the buffer is safe now


def test_copy_reading_unfinished_results_is_rule_c(cp):
    ops = Ops(cp)
    y = cp.ones(4) * 3.0
    with pytest.raises(cp.HazardError, match=r"rule c.*shape \(4,\)"):
        y.get(stream=ops.stream, out=ops.host_buffer((4,), y.dtype), blocking=False)


def test_overwriting_a_buffer_a_queued_copy_reads_is_rule_a(cp):
    ops = Ops(cp)
    y = cp.ones(4)
    event = ops.to_host(y, ops.host_buffer((4,), y.dtype), ops.mark())
    with pytest.raises(cp.HazardError, match=r"write-before-copy-read \(rule a\)"):
        y *= 2.0
    event.synchronize()
    y *= 2.0


def test_reading_before_the_copy_is_done_is_rule_a(cp):
    ops = Ops(cp)
    with ops.stream:
        dev = cp.asarray(np.full(3, 5.0))  # queued on the side stream
    with pytest.raises(cp.HazardError, match=r"read-before-copy-done \(rule a\).*\(3,\)"):
        dev + 1.0
    ops.join(ops.stream.record())  # the current stream waits for the copy
    assert (dev + 1.0).get().tolist() == [6.0, 6.0, 6.0]


def test_receive_copy_into_a_buffer_in_use_is_rule_b(cp):
    ops = Ops(cp)
    dev = cp.zeros((2, 2))  # touched by the compute stream (zeroed, then read)
    float(dev.sum())  # even a synchronized host read leaves the copy stream unordered
    with pytest.raises(cp.HazardError, match=r"rule b.*\(2, 2\).*wait_event"):
        dev.set(np.ones((2, 2)), stream=ops.stream)


def test_receive_copy_after_the_compute_is_safe(cp):
    """The receive pattern done right: the copy stream waits for the compute stream, and the
    compute stream waits for the copy before using the buffer (the transport's staged receive)."""
    ops = Ops(cp)
    dev = cp.zeros((2, 2))
    host = ops.host_buffer((2, 2), dev.dtype)
    host[...] = 4.0
    event = ops.to_device(host, dev, ops.mark())
    assert poll(ops, event)[-1]
    ops.join(event)
    assert (dev * 2).get().tolist() == [[8.0, 8.0], [8.0, 8.0]]


def test_cupyops_to_device_waits_for_the_compute_stream(cp):
    """The copy into a receive buffer must wait for an event recorded after the buffer's last
    use on the compute stream (the transport records it when the receive is posted); an older
    event is the race CupyOps.to_device once had (rule b)."""
    ops = Ops(cp)
    dev = cp.zeros((2, 2))
    stale = ops.mark()
    dev *= 3.0  # the compute stream uses the buffer after `stale`
    with pytest.raises(cp.HazardError, match=r"rule b"):
        ops.to_device(ops.host_buffer((2, 2), dev.dtype), dev, stale)
    ops.join(ops.to_device(ops.host_buffer((2, 2), dev.dtype), dev, ops.mark()))


# -- MPI, real kernels, whole runs ----------------------------------------------------------------
@pytest.mark.parametrize("aware", ["0", "1"])
def test_device_buffers_and_mpi(aware):
    r = mpirun.run(
        ["tests/scripts/fake_cupy_mpi.py"],
        n=2,
        timeout=60,
        PYTHONPATH=FAKE_PATH,
        FAKE_CUPY_MPI_AWARE=aware,
    )
    assert r.returncode == 0, r.output
    assert r.stdout.count("aware ok" if aware == "1" else "refused") == 2, r.output


def test_kernels_and_training_on_the_fake_match_numpy_bitwise():
    r = mpirun.run(["tests/scripts/fake_cupy_layers.py"], timeout=120, PYTHONPATH=FAKE_PATH)
    assert r.returncode == 0 and "bitwise equal" in r.stdout, r.output


def test_resume_on_the_fake_gpu(tmp_path):
    flags = [*TINY, "--backend", "cupy", "--checkpoint-dir", str(tmp_path)]
    r = mpirun.train(None, *flags, timeout=60, PYTHONPATH=FAKE_PATH)
    assert r.returncode == 0, r.output
    r = mpirun.train(None, *flags, "--steps", "3", "--resume", "auto", PYTHONPATH=FAKE_PATH)
    assert r.returncode == 0 and "resumed from" in r.stdout, (
        r.output
    )  # an explicit host-to-device copy
