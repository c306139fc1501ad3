"""Two ranks exchange fake device buffers through the staged transport; rank 1 checks the bytes.

Also the pattern that hung before the transport advanced staged sends while waiting: rank 0
sends an activation and then waits for the gradient that rank 1 sends only after receiving it.
"""

import numpy as np
from mpi4py import MPI

from mpipipe.parallel.transport import Transport
from tests.fake_device import FakeDeviceArray, FakeOps

comm = MPI.COMM_WORLD
ops = FakeOps(delay=3)
transport = Transport(ops, aware=False)
p2p = transport.link(comm)
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
    host = sum(len(v) for v in transport.pool.free.values())
    assert host == len(shapes), host  # every staging buffer came back to the pool
    assert transport.idle
# ping-pong: a staged send must be posted while its sender waits for something else
act = FakeDeviceArray(np.full((8, 8), 3.0))
grad = FakeDeviceArray(np.zeros((8, 8)))
if comm.rank == 0:
    send = p2p.isend(act, 1, tag=50)
    p2p.wait(p2p.irecv(grad, 1, tag=51))  # hangs if the send above is never posted
    assert np.array_equal(grad.data, np.full((8, 8), 6.0))
    p2p.wait(send)
else:
    p2p.wait(p2p.irecv(grad, 0, tag=50))
    p2p.wait(p2p.isend(FakeDeviceArray(grad.data * 2), 0, tag=51))
# reduce-scatter and all-gather, staged (fake device) and on host arrays, in one queue
for wrap in (FakeDeviceArray, lambda a: a):
    whole = wrap(np.arange(6.0) * (comm.rank + 1))  # ranks 0, 1: sum is 3 x arange
    block = wrap(np.zeros(3))
    gathered = wrap(np.zeros(2 * 3, np.float32))
    mine = wrap(np.full(3, comm.rank, np.float32))
    first = transport.ireduce_scatter(comm, whole, block)
    second = transport.iallgather(comm, mine, gathered)
    transport.waitall([second, first])  # waiting out of order: posted in call order anyway
    got = block.data if isinstance(block, FakeDeviceArray) else block
    assert got.tolist() == (3 * np.arange(6.0))[3 * comm.rank : 3 * comm.rank + 3].tolist(), got
    got = gathered.data if isinstance(gathered, FakeDeviceArray) else gathered
    assert got.tolist() == [0, 0, 0, 1, 1, 1], got
    now = wrap(np.zeros(2 * 3, np.float32))
    transport.allgather_now(comm, mine, now)
    transport.reduce_scatter_now(comm, whole, block)
    assert transport.idle
try:
    transport.ireduce_scatter(comm, np.zeros(5), np.zeros(2))
    raise AssertionError("a reduce-scatter of 5 elements over 2 ranks was accepted")
except ValueError as e:
    assert "pad the whole buffer" in str(e), e
plain = np.zeros(3)
if comm.rank == 0:
    p2p.wait(p2p.isend(np.ones(3), 1, tag=99))  # host arrays pass straight through
else:
    p2p.wait(p2p.irecv(plain, 0, tag=99))
    assert plain.tolist() == [1, 1, 1]
copies = comm.gather(ops.copies)
if comm.rank == 0:
    print(f"ok copies {copies}", flush=True)
