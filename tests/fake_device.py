"""A fake device array and copy engine, so the staging transport runs on CPUs."""

from __future__ import annotations

import numpy as np


class FakeDeviceArray:
    """Device memory stand-in: wraps a NumPy array, is not one (so it needs staging)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)


class _Event:
    def __init__(self, polls: int, action) -> None:
        self.left, self.action = polls, action


class FakeOps:
    """Copies complete only after `delay` polls, as an asynchronous engine would."""

    def __init__(self, delay: int = 3) -> None:
        self.delay, self.copies = delay, 0

    def is_device(self, a) -> bool:
        return isinstance(a, FakeDeviceArray)

    def host_buffer(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def sync_producer(self) -> None:
        return None

    def to_host(self, dev, host):
        self.copies += 1
        return _Event(self.delay, lambda: host.__setitem__(..., dev.data))

    def to_device(self, host, dev):
        self.copies += 1
        return _Event(self.delay, lambda: dev.data.__setitem__(..., host))

    def done(self, event) -> bool:
        if event.left > 0:
            event.left -= 1
            if event.left == 0:
                event.action()
        return event.left == 0

    def sync(self, event) -> None:
        assert event.left == 0
