"""Two ranks hand fake device arrays to MPI: refused without FAKE_CUPY_MPI_AWARE=1; with it,
accepted (the bytes really move) only once the producing stream is synchronized.

Run with the fake first on the path: PYTHONPATH=tests/fakegpu:. mpiexec -n 2 python ...
"""

import cupy
import numpy as np
from cupy import _fake
from mpi4py import MPI

comm = MPI.COMM_WORLD
me, other = comm.rank, 1 - comm.rank
current = cupy.cuda.get_current_stream()


def refused(call, error, text):
    try:
        call()
    except error as e:
        assert text in str(e), e
        return
    raise AssertionError(f"{text!r} was not raised")


x = cupy.arange(8.0) * (me + 1)  # produced by a kernel on the current stream
if not _fake.MPI_AWARE:
    text = "not CUDA-aware (stage it through host memory)"
    refused(lambda: comm.Isend(x, other, 0), _fake.MPIHandoffError, text)
    refused(lambda: comm.Irecv(x, other, 0), _fake.MPIHandoffError, text)
    refused(lambda: comm.Iallreduce(MPI.IN_PLACE, x, op=MPI.SUM), _fake.MPIHandoffError, text)
    print("refused", me)
    raise SystemExit(0)

unsynced = "before the stream that produced or last used it was synchronized"
refused(lambda: comm.Isend(x, other, 0), _fake.HazardError, unsynced)
current.synchronize()
out = cupy.zeros(8)  # allocated (zeroed) by a kernel after the synchronize
refused(lambda: comm.Irecv(out, other, 0), _fake.HazardError, unsynced)
current.record().synchronize()  # an event after the last use does as well
MPI.Request.Waitall([comm.Isend(x, other, 0), comm.Irecv(out, other, 0)])
assert np.array_equal(out.get(), np.arange(8.0) * (other + 1))

total = x * 1  # in-place all-reduce of a fresh kernel's output
cupy.cuda.Device().synchronize()
comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM).Wait()
assert np.array_equal(total.get(), np.arange(8.0) * 3)

side = cupy.cuda.Stream(non_blocking=True)  # a copy still queued into the buffer: refused
pending = cupy.zeros(8)
current.synchronize()
side.wait_event(current.record())
pending.set(np.ones(8), stream=side)
refused(lambda: comm.Isend(pending, other, 1), _fake.HazardError, "still queued")
side.synchronize()


class OnlyCAI:
    """Exposes nothing but the CUDA array interface, so mpi4py must use that one."""

    def __init__(self, a):
        self.a = a

    @property
    def __cuda_array_interface__(self):
        return self.a.__cuda_array_interface__


back = cupy.zeros(8)
current.synchronize()
reqs = [comm.Isend(OnlyCAI(x), other, 2), comm.Irecv(OnlyCAI(back), other, 2)]
MPI.Request.Waitall(reqs)
assert np.array_equal(back.get(), np.arange(8.0) * (other + 1))
print("aware ok", me)
