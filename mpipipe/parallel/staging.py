"""The device work behind the transport: events, copies on a side stream, pinned host buffers.

`DeviceOps` is the interface the transport (parallel/transport.py) drives; it never blocks the
host. `CupyOps` is the GPU's (the only one that touches CUDA streams), `HostOps` stands for "no
device" (NumPy), and tests drive the same transport with a fake device on CPUs. Host buffers come
from a free list per (shape, dtype): allocated during the first step, reused after.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Event = Any


class DeviceOps(Protocol):
    """What the transport needs of a device. Events are opaque; none of these blocks."""

    has_device: bool

    def is_device(self, a: Any) -> bool: ...

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray: ...

    def mark(self) -> Event:
        """An event on the compute stream after all the work queued so far."""
        ...

    def to_host(self, dev: Any, host: np.ndarray, after: Event) -> Event:
        """Copy dev -> host on a side stream once `after` has completed; the copy's event."""
        ...

    def to_device(self, host: np.ndarray, dev: Any, after: Event) -> Event:
        """Copy host -> dev on a side stream once `after` has completed; the copy's event."""
        ...

    def done(self, event: Event) -> bool:
        """Has the work before `event` completed? (a query, not a wait)"""
        ...

    def join(self, event: Event) -> None:
        """Make the compute stream wait for `event` before its next kernel (no host wait)."""
        ...


class HostOps:
    """No device: every array is a host array and goes to MPI as it is."""

    has_device = False

    def is_device(self, a: Any) -> bool:
        return False

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def mark(self) -> Event:
        raise RuntimeError("HostOps has no device")

    def to_host(self, dev: Any, host: np.ndarray, after: Event) -> Event:
        raise RuntimeError("HostOps has no device")

    def to_device(self, host: np.ndarray, dev: Any, after: Event) -> Event:
        raise RuntimeError("HostOps has no device")

    def done(self, event: Event) -> bool:
        raise RuntimeError("HostOps has no device")

    def join(self, event: Event) -> None:
        raise RuntimeError("HostOps has no device")


class HostPool:
    """Staging buffers by (shape, dtype), reused from the second step on."""

    def __init__(self, ops: DeviceOps) -> None:
        self.ops = ops
        self.free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        bucket = self.free.setdefault((tuple(shape), np.dtype(dtype).str), [])
        return bucket.pop() if bucket else self.ops.host_buffer(tuple(shape), dtype)

    def give(self, buf: np.ndarray) -> None:
        self.free.setdefault((buf.shape, buf.dtype.str), []).append(buf)


class CupyOps:
    """Copies on a non-blocking side stream of this rank's GPU, pinned host buffers. The compute
    stream is the one current when the runtime was built; every call names the device, so the
    data-parallel progress thread may drive copies too."""

    has_device = True

    def __init__(self) -> None:
        from mpipipe.xp import get  # the one module that imports CuPy

        self.cupy = get("cupy")
        self.device = self.cupy.cuda.Device()
        self.compute = self.cupy.cuda.get_current_stream()
        with self.device:
            self.stream = self.cupy.cuda.Stream(non_blocking=True)

    def is_device(self, a: Any) -> bool:
        return isinstance(a, self.cupy.ndarray)

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        from mpipipe.xp import pinned_empty

        return pinned_empty(shape, dtype)

    def mark(self) -> Event:
        with self.device:
            return self.compute.record()

    def to_host(self, dev: Any, host: np.ndarray, after: Event) -> Event:
        with self.device:
            self.stream.wait_event(after)
            dev.get(stream=self.stream, out=host, blocking=False)
            return self.stream.record()

    def to_device(self, host: np.ndarray, dev: Any, after: Event) -> Event:
        with self.device:
            self.stream.wait_event(after)
            dev.set(host, stream=self.stream)
            return self.stream.record()

    def done(self, event: Event) -> bool:
        with self.device:
            return bool(event.done)

    def join(self, event: Event) -> None:
        with self.device:
            self.compute.wait_event(event)
