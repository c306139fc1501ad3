"""Stopping cleanly when the scheduler asks: SIGTERM / SIGUSR1 set a flag for the run loop."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before the time limit) set a flag; the step's grid-
    wide all-reduce spreads it, so every rank finishes the same step, saves and stops."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.name: str | None = None
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
