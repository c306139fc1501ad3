"""The fake's engine: counters, streams and events, queued copies, and the hazard rules.

Array math runs eagerly on the compute stream (the current stream outside `with side:` blocks)
and numbers its operations 1, 2, 3...; each device buffer remembers the last operation that
touched and that wrote it. A copy issued on a side stream is queued and runs only when the host
learns it finished (an event after it polled `done` DELAY times, or synchronized) or when the
compute stream waits on such an event. A side stream that waited on a compute-stream event
recorded after operation N is ordered after operations 1..N; that horizon is what the rules check:

(a) an operation touches a buffer with a queued copy into it (or writes one a copy still reads);
(b) a side-stream copy writes a buffer the compute stream touched after the copy stream's horizon;
(c) a side-stream copy reads a buffer the compute stream wrote after the copy stream's horizon;
and MPI may only see a buffer whose last touch the host knows has finished (`handoff`).

Knobs (read once, test code only): FAKE_CUPY_DELAY (default 3), FAKE_CUPY_DEVICES (default 1),
FAKE_CUPY_MPI_AWARE=1 (MPI may take device buffers).
"""

from __future__ import annotations

import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

DELAY = int(os.environ.get("FAKE_CUPY_DELAY", "3"))
DEVICES = int(os.environ.get("FAKE_CUPY_DEVICES", "1"))
MPI_AWARE = os.environ.get("FAKE_CUPY_MPI_AWARE", "") == "1"

COUNTERS = (
    "ops",  # operations on the compute stream (kernels and copies)
    "host_syncs",  # the host blocked on the device: float(), .get(), synchronize()...
    "d2h_copies",
    "d2h_bytes",
    "h2d_copies",
    "h2d_bytes",
    "pinned_allocs",
    "pinned_bytes",
    "pageable_async_copies",  # asynchronous copies from/to pageable memory (CUDA serialises)
)
counts = dict.fromkeys(COUNTERS, 0)


def reset() -> None:
    """Zero the counters (stream and buffer state is kept)."""
    counts.update(dict.fromkeys(COUNTERS, 0))


def snapshot() -> dict[str, int]:
    return dict(counts)


class HazardError(RuntimeError):
    """A use of device memory that a real GPU would race on."""


class MPIHandoffError(BufferError):
    """A device buffer given to an MPI library that cannot take one."""


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        super().__init__(text)


class _Clock:
    op = 0  # operations issued on the compute stream
    synced = 0  # operations the host knows have finished
    device = 0  # the current device


class Buffer:
    """One allocation (an owning NumPy array); every view of it shares this record."""

    def __init__(self, owner: np.ndarray) -> None:
        self.owner, self.device = owner, _Clock.device
        self.touched = self.written = 0  # last compute-stream operation touching / writing it
        self.copies_in: list[_Copy] = []  # queued copies that write it
        self.copies_out: list[_Copy] = []  # queued copies that read it
        self.wrapper: Any = None  # weak reference to the fake array that owns it (`.base`)

    def __str__(self) -> str:
        return f"the {self.owner.dtype} device buffer of shape {self.owner.shape}"


_buffers: weakref.WeakValueDictionary[int, Buffer] = weakref.WeakValueDictionary()
_pinned: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def buffer_of(a: np.ndarray) -> tuple[Buffer, bool]:
    """(the buffer holding `a`, whether it is new)."""
    owner = _owner(a)
    buf = _buffers.get(id(owner))
    if buf is not None and buf.owner is owner:
        return buf, False
    buf = _buffers[id(owner)] = Buffer(owner)
    return buf, True


def pin(a: np.ndarray) -> np.ndarray:
    _pinned[id(a)] = a
    counts["pinned_allocs"] += 1
    counts["pinned_bytes"] += a.nbytes
    return a


def is_pinned(a: np.ndarray) -> bool:
    return _pinned.get(id(_owner(a))) is _owner(a)


class _Copy:
    def __init__(self, dev: Buffer, to_device: bool, action: Callable[[], None]) -> None:
        self.dev, self.to_device, self.action = dev, to_device, action

    def run(self) -> None:
        self.action()
        (self.dev.copies_in if self.to_device else self.dev.copies_out).remove(self)


class Stream:
    """A CUDA stream: a queue of copies (array math runs only on the compute stream)."""

    null: Stream
    _made = 0

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0) -> None:
        Stream._made += 1
        self.ptr = 0 if null else Stream._made
        self.non_blocking = non_blocking
        self.queue: deque[_Copy] = deque()
        self.issued = self.executed = 0
        self.waited = 0  # compute-stream operations this stream is ordered after
        _streams.add(self)

    def __repr__(self) -> str:
        return f"<fake Stream {self.ptr}{' (null)' if self.ptr == 0 else ''}>"

    def __enter__(self) -> Stream:
        _stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack.pop()

    def use(self) -> Stream:
        """Make this the current (compute) stream of the thread."""
        global _default
        _default = self
        return self

    def horizon(self) -> int:
        """Compute-stream operations finished once everything issued here so far has."""
        return _Clock.op if self is _default else self.waited

    def run_until(self, n: int) -> None:
        while self.executed < n:
            self.queue.popleft().run()
            self.executed += 1

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        if event.stream is None:  # never recorded: nothing to wait for (as in CUDA)
            return
        self.waited = max(self.waited, event.horizon)
        if event.stream is not self:  # this stream's later work runs after the event's
            event.stream.run_until(event.upto)

    def synchronize(self) -> None:
        counts["host_syncs"] += 1
        self.run_until(self.issued)
        _Clock.synced = max(_Clock.synced, self.horizon())


_streams: weakref.WeakSet[Stream] = weakref.WeakSet()
Stream.null = Stream(null=True)
_default = Stream.null
_stack: list[Stream] = []


def get_current_stream() -> Stream:
    return _stack[-1] if _stack else _default


class Event:
    """A marker in a stream: `done` turns True on the DELAY-th poll, when the copies before it
    run; `synchronize()` runs them at once. A never-recorded event is done (as in CUDA)."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self.stream: Stream | None = None
        self.upto = self.horizon = self.polls = 0
        self.complete, self.at = True, 0.0

    def record(self, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        self.stream, self.upto, self.horizon = s, s.issued, s.horizon()
        self.polls, self.complete = 0, False
        self.at = time.perf_counter()  # array math runs eagerly: the host clock is its clock

    @property
    def done(self) -> bool:
        if not self.complete:
            self.polls += 1
            if self.polls >= DELAY:
                self._finish()
        return self.complete

    def synchronize(self) -> None:
        counts["host_syncs"] += 1
        if not self.complete:
            self._finish()

    def _finish(self) -> None:
        assert self.stream is not None
        self.stream.run_until(self.upto)
        _Clock.synced = max(_Clock.synced, self.horizon)
        self.complete = True


class Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = _Clock.device if device is None else int(device)
        self._previous: list[int] = []

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"

    @property
    def compute_capability(self) -> str:
        return "90"

    def use(self) -> None:
        check_device(self.id)
        _Clock.device = self.id

    def __enter__(self) -> Device:
        self._previous.append(_Clock.device)
        self.use()
        return self

    def __exit__(self, *exc: object) -> None:
        _Clock.device = self._previous.pop()

    def synchronize(self) -> None:
        counts["host_syncs"] += 1
        for s in list(_streams):
            s.run_until(s.issued)
        _Clock.synced = _Clock.op


def check_device(i: int) -> None:
    if not 0 <= i < DEVICES:
        raise CUDARuntimeError(101, "cudaErrorInvalidDevice: invalid device ordinal")


def _side_stream_math() -> NotImplementedError:
    return NotImplementedError(
        f"array math on {get_current_stream()!r}: the fake runs kernels on the compute stream "
        "only (issue copies on side streams, compute outside `with stream:`)"
    )


def launch(reads: Iterable[Buffer], writes: Iterable[Buffer]) -> None:
    """An operation on the compute stream that reads and writes these buffers (rule a)."""
    s = get_current_stream()
    if s is not _default:
        raise _side_stream_math()
    s.run_until(s.issued)  # stream order: copies issued here earlier come first
    reads, writes = list(reads), list(writes)
    for buf in reads + writes:
        if buf.copies_in:
            raise HazardError(
                f"read-before-copy-done (rule a): a kernel on the current stream touches {buf} "
                f"while a copy into it is still queued on a side stream; make the current "
                "stream wait for it first: current.wait_event(copy_stream.record())"
            )
    for buf in writes:
        if buf.copies_out:
            raise HazardError(
                f"write-before-copy-read (rule a): a kernel on the current stream writes {buf} "
                "while a copy out of it is still queued on a side stream; wait for the copy's "
                "event (or synchronize it) before reusing the buffer"
            )
    _Clock.op += 1
    counts["ops"] += 1
    for buf in reads:
        buf.touched = _Clock.op
    for buf in writes:
        buf.touched = buf.written = _Clock.op


def produced(buf: Buffer) -> None:
    """A new buffer, written by the operation just launched (allocation is stream-ordered: its
    memory may come from buffers that queued kernels still use)."""
    if get_current_stream() is _default:
        buf.touched = buf.written = _Clock.op


def copy(
    stream: Stream, dev: Buffer, host: np.ndarray, to_device: bool, action: Callable[[], None]
) -> None:
    """Queue a copy between host memory and device buffer `dev` on `stream` (rules b and c)."""
    if stream is _default:
        launch((), (dev,)) if to_device else launch((dev,), ())
    else:
        need = dev.touched if to_device else dev.written
        if stream.waited < need:
            rule, verb, what = (
                ("(rule b)", "writes", "touched") if to_device else ("(rule c)", "reads", "wrote")
            )
            raise HazardError(
                f"copy races the compute {rule}: a copy on {stream!r} {verb} {dev}, which the "
                f"current stream last {what} at operation {need}, but {stream!r} only waited "
                f"for operations up to {stream.waited}; record an event on the current stream "
                "and make the copy stream wait on it first: "
                "copy_stream.wait_event(current.record())"
            )
    c = _Copy(dev, to_device, action)
    stream.queue.append(c)
    stream.issued += 1
    (dev.copies_in if to_device else dev.copies_out).append(c)
    kind = "h2d" if to_device else "d2h"
    counts[f"{kind}_copies"] += 1
    counts[f"{kind}_bytes"] += host.nbytes


def host_read(buf: Buffer, nbytes: int) -> None:
    """A blocking read of device data by the host (float(), .item(), printing...)."""
    launch((buf,), ())
    counts["d2h_copies"] += 1
    counts["d2h_bytes"] += nbytes
    _default.synchronize()


def handoff(buf: Buffer) -> None:
    """May MPI take this buffer's device pointer now? MPI knows nothing of streams."""
    if not MPI_AWARE:
        raise MPIHandoffError(
            "a device buffer was handed to an MPI library that is not CUDA-aware (stage it "
            f"through host memory): {buf} was exported by __dlpack__ or "
            "__cuda_array_interface__, which no host consumer can read (set "
            "FAKE_CUPY_MPI_AWARE=1 to model a CUDA-aware MPI)"
        )
    queued = buf.copies_in or buf.copies_out
    if queued or buf.touched > _Clock.synced:
        raise HazardError(
            "device buffer handed to MPI before the stream that produced or last used it was "
            f"synchronized: {buf} was last touched at operation {buf.touched}, the host knows "
            f"operations up to {_Clock.synced} finished"
            + (", and a copy into or out of it is still queued" if queued else "")
            + "; call stream.synchronize() (or synchronize an event recorded after it) first"
        )


def get_elapsed_time(start: Event, end: Event) -> float:
    """Milliseconds between two completed events (CUDA's cudaEventElapsedTime)."""
    earlier = start.stream is end.stream and start.upto <= end.upto  # done when `end` is
    if not (end.complete and (start.complete or earlier)):
        raise CUDARuntimeError(600, "cudaErrorNotReady: an event has not completed")
    return (end.at - start.at) * 1e3
