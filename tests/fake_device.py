"""A minimal fake device for the transport's unit tests: arrays that are not host arrays, and
copies that complete only after a few polls, as an asynchronous engine's would."""

from __future__ import annotations

from typing import Any

import numpy as np


class FakeDeviceArray:
    """Device memory stand-in: wraps a NumPy array, is not one (so it needs staging)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)


class _Event:
    def __init__(self, polls: int, action: Any = None) -> None:
        self.left, self.action = polls, action


class FakeOps:
    """Copies complete after `delay` polls; `joins` counts compute-stream waits."""

    has_device = True

    def __init__(self, delay: int = 3) -> None:
        self.delay, self.copies, self.marks, self.joins = delay, 0, 0, 0

    def is_device(self, a: Any) -> bool:
        return isinstance(a, FakeDeviceArray)

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def mark(self) -> _Event:
        self.marks += 1
        return _Event(self.delay)

    def to_host(self, dev: FakeDeviceArray, host: np.ndarray, after: _Event) -> _Event:
        self.copies += 1
        return _Event(self.delay, lambda: host.__setitem__(..., dev.data))

    def to_device(self, host: np.ndarray, dev: FakeDeviceArray, after: _Event) -> _Event:
        self.copies += 1
        return _Event(self.delay, lambda: dev.data.__setitem__(..., host))

    def done(self, event: _Event) -> bool:
        if event.left > 0:
            event.left -= 1
            if event.left == 0 and event.action is not None:
                event.action()
        return event.left == 0

    def join(self, event: _Event) -> None:
        assert event.left == 0
        self.joins += 1
