"""Device buffers over an MPI library that is not CUDA-aware: staged through host memory.

A send copies the device array into a pinned host buffer on a side stream and issues the
`Isend` once the copy is done; a receive lands in a pinned host buffer and is copied to the
device buffer once MPI completes it. Both return request-like objects with `Test()`, so the
runtime's waits (and its progress polling) drive the copies and the messages alike, and the
copies overlap the compute on the default stream. Host buffers come from a free list per
(shape, dtype): allocated during the first step, reused after.

The copy engine is behind `DeviceOps`: `CupyOps` on GPUs, `FakeOps` in the CPU tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from mpipipe.parallel.p2p import P2P


class HostPool:
    def __init__(self, ops: Any) -> None:
        self.ops, self.free = ops, {}

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        bucket = self.free.setdefault((tuple(shape), np.dtype(dtype).str), [])
        return bucket.pop() if bucket else self.ops.host_buffer(shape, dtype)

    def give(self, buf: np.ndarray) -> None:
        self.free.setdefault((buf.shape, buf.dtype.str), []).append(buf)


class _StagedSend:
    def __init__(self, p2p: StagedP2P, event: Any, host: np.ndarray, dest: int, tag: int):
        self.p2p, self.event, self.host, self.dest, self.tag = p2p, event, host, dest, tag
        self.req: MPI.Request | None = None
        self.done = False

    def Test(self) -> bool:  # noqa: N802 - the MPI name, so waits treat both alike
        if self.done:
            return True
        if self.req is None:
            if not self.p2p.ops.done(self.event):
                return False
            self.req = self.p2p.comm.Isend(self.host, dest=self.dest, tag=self.tag)
        if self.req.Test():
            self.done = True
            self.p2p.pool.give(self.host)
        return self.done


class _StagedRecv:
    def __init__(self, p2p: StagedP2P, req: MPI.Request, host: np.ndarray, dev: Any):
        self.p2p, self.req, self.host, self.dev = p2p, req, host, dev
        self.event: Any = None
        self.done = False

    def Test(self) -> bool:  # noqa: N802
        if self.done:
            return True
        if self.event is None:
            if not self.req.Test():
                return False
            self.event = self.p2p.ops.to_device(self.host, self.dev)
        if self.p2p.ops.done(self.event):
            self.p2p.ops.sync(self.event)  # the device buffer is ready for the next kernel
            self.done = True
            self.p2p.pool.give(self.host)
        return self.done


class StagedP2P(P2P):
    """P2P for device arrays through host memory (host arrays pass straight through)."""

    def __init__(self, comm: MPI.Comm, ops: Any, **kw: Any) -> None:
        super().__init__(comm, **kw)
        self.ops, self.pool = ops, HostPool(ops)

    def isend(self, buf: Any, dest: int, tag: int) -> Any:
        if not self.ops.is_device(buf):
            return super().isend(buf, dest, tag)
        host = self.pool.take(buf.shape, buf.dtype)
        return _StagedSend(self, self.ops.to_host(buf, host), host, dest, tag)

    def irecv(self, buf: Any, source: int, tag: int) -> Any:
        if not self.ops.is_device(buf):
            return super().irecv(buf, source, tag)
        host = self.pool.take(buf.shape, buf.dtype)
        return _StagedRecv(self, self.comm.Irecv(host, source=source, tag=tag), host, buf)


class AwareP2P(P2P):
    """P2P for a CUDA-aware MPI: device arrays go to MPI directly, after the stream that
    produced them has finished (MPI knows nothing of CUDA streams)."""

    def __init__(self, comm: MPI.Comm, ops: Any, **kw: Any) -> None:
        super().__init__(comm, **kw)
        self.ops = ops

    def isend(self, buf: Any, dest: int, tag: int) -> Any:
        if self.ops.is_device(buf):
            self.ops.sync_producer()
        return super().isend(buf, dest, tag)


class CupyOps:  # pragma: no cover - needs a GPU
    """Copies on a non-blocking side stream; pinned host buffers."""

    def __init__(self) -> None:
        from mpipipe.xp import get  # the one module that imports CuPy

        self.cupy = get("cupy")
        self.stream = self.cupy.cuda.Stream(non_blocking=True)

    def is_device(self, a: Any) -> bool:
        return isinstance(a, self.cupy.ndarray)

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        from mpipipe.xp import pinned_empty

        return pinned_empty(shape, dtype)

    def sync_producer(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def to_host(self, dev: Any, host: np.ndarray) -> Any:
        ready = self.cupy.cuda.get_current_stream().record()  # after the producing kernels
        self.stream.wait_event(ready)
        dev.get(stream=self.stream, out=host, blocking=False)
        return self.stream.record()

    def to_device(self, host: np.ndarray, dev: Any) -> Any:
        dev.set(host, stream=self.stream)
        return self.stream.record()

    def done(self, event: Any) -> bool:
        return bool(event.done)

    def sync(self, event: Any) -> None:
        self.cupy.cuda.get_current_stream().wait_event(event)
