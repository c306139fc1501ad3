"""Stopping cleanly when asked: SIGTERM / SIGUSR1 / SIGINT set a flag for the run loop; a second
SIGINT aborts at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

ABORT_STATUS = 128 + signal.SIGINT  # 130: what a shell reports for Ctrl-C
# between the abort's announcement and the abort: the launcher reads the rank's output on its
# own schedule and MPI_Abort tears its pipes down, which lost the line about 1 run in 7 (MPICH)
ANNOUNCE_S = 0.2


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before the time limit) and SIGINT (Ctrl-C; MPICH's
    mpiexec forwards the first one to every rank) set a flag; the step's grid-wide all-reduce
    spreads it, so every rank finishes the same step, saves and stops. A second SIGINT calls
    `abort(130)` at once.

    The work is done by a watcher thread woken through `signal.set_wakeup_fd`, not by the Python
    handler: that runs only when the main thread returns to the interpreter, never while it
    waits inside MPI (a hung peer, the very case where one presses Ctrl-C twice)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(
        self,
        abort: Callable[[int], None] = os._exit,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.name: str | None = None  # the first signal received
        self.signum = 0
        self.interrupts = 0
        self.abort, self.announce = abort, announce
        self.previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._thread: threading.Thread | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        """Installed so that Python reports the signal to the wakeup fd; _watch acts on it."""

    def received(self, signum: int) -> None:
        if not self.signum:
            self.signum, self.name = signum, signal.Signals(signum).name
        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts == 1 and self.announce:
            self.announce("SIGINT: stopping after this step (and saving); a second one aborts")
        elif self.interrupts >= 2:
            if self.announce:
                self.announce(
                    f"second SIGINT: aborting now (exit {ABORT_STATUS}); nothing saved since "
                    "the last checkpoint"
                )
                time.sleep(ANNOUNCE_S)
            self.abort(ABORT_STATUS)

    def _watch(self, fd: int) -> None:
        while data := os.read(fd, 64):  # b"" once __exit__ closes the write end
            for signum in data:
                self.received(signum)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only (a run started from a thread)
        sigs = {getattr(signal, name) for name in self.SIGNALS}
        for sig in sigs:
            self.previous[sig] = signal.signal(sig, self._handler)
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._old_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._thread = threading.Thread(
            target=self._watch, args=(self._pipe[0],), name="mpipipe-signals", daemon=True
        )
        self._thread.start()
        # a launcher or a parent script may have started us with these blocked: we want them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self._pipe[1])
        assert self._thread is not None
        self._thread.join()
        os.close(self._pipe[0])
        self._pipe = None
