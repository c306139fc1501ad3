"""No silent hangs: a per-rank watchdog thread that aborts the job when a rank stops making
progress, after saying where it is stuck.

The runtime reports progress (`beat`) at every action and phase, and says what it is about to
wait for (`waiting`). If no beat comes for `timeout_s`, the watchdog prints, on that rank, the
step, the action and the message it is waiting for (peer, tag, size), then calls MPI_Abort so
that every rank ends. A rank stuck in its own compute says so; its neighbours name it as the
peer they wait for.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, abort: Callable[[int], None]) -> None:
        self.timeout_s, self.rank, self.abort = timeout_s, rank, abort
        self.last = time.monotonic()
        self.where = "starting up"
        self.detail = ""
        self.step = -1
        self.paused_for: str | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        if timeout_s > 0:
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()

    def beat(self, where: str) -> None:
        """Progress: the rank has reached `where`."""
        self.last = time.monotonic()
        self.where, self.detail = where, ""

    def waiting(self, detail: str) -> None:
        """The rank is about to block for `detail` (a message, a collective)."""
        self.detail = detail

    @contextmanager
    def paused(self, where: str) -> Iterator[None]:
        """Long work with no beats of its own (a checkpoint save or load): not a hang."""
        self.beat(where)
        self.paused_for = where
        try:
            yield
        finally:
            self.paused_for = None
            self.beat(f"after {where}")

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self.stopped.wait(poll):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s and self.paused_for is None:
                what = self.detail or "not waiting for any message (stuck in its own work?)"
                print(
                    f"mpipipe: watchdog: rank {self.rank} made no progress for {idle:.0f} s "
                    f"(--timeout-s {self.timeout_s:g}) in step {self.step + 1} at {self.where}: "
                    f"{what}; aborting the job",
                    file=sys.stderr,
                    flush=True,
                )
                self.abort(3)
                return

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


class NoWatchdog:
    """Stands in when no watchdog runs (the executor always reports)."""

    step = -1

    def beat(self, where: str) -> None:
        return None

    def waiting(self, detail: str) -> None:
        return None

    @contextmanager
    def paused(self, where: str) -> Iterator[None]:
        yield

    def close(self) -> None:
        return None
