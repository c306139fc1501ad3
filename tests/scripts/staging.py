"""Two ranks exchange fake device buffers through StagedP2P; rank 1 checks the bytes."""

import numpy as np
from mpi4py import MPI

from mpipipe.parallel.staging import StagedP2P
from tests.fake_device import FakeDeviceArray, FakeOps

comm = MPI.COMM_WORLD
ops = FakeOps(delay=3)
p2p = StagedP2P(comm, ops)
shapes = [(4, 5), (1000,), (3, 64, 64)]
for step in range(3):  # host buffers are reused from the second step on
    reqs = []
    for i, shape in enumerate(shapes):
        if comm.rank == 0:
            value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + step + i
            reqs.append(p2p.isend(FakeDeviceArray(value), 1, tag=i))
        else:
            out = FakeDeviceArray(np.zeros(shape, np.float32))
            reqs.append((p2p.irecv(out, 0, tag=i), out, shape, i))
    if comm.rank == 0:
        p2p.waitall(reqs)
    else:
        for req, out, shape, i in reqs:
            p2p.wait(req)
            want = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + step + i
            assert np.array_equal(out.data, want), (step, i)
    host = sum(len(v) for v in p2p.pool.free.values())
    assert host == len(shapes), host  # every staging buffer came back to the pool
plain = np.zeros(3)
if comm.rank == 0:
    p2p.wait(p2p.isend(np.ones(3), 1, tag=99))  # host arrays pass straight through
else:
    p2p.wait(p2p.irecv(plain, 0, tag=99))
    assert plain.tolist() == [1, 1, 1]
print("ok", comm.rank, "copies", ops.copies)
