"""Progress bars and in-place redraws on a terminal a person watches, plain lines everywhere
else, under either MPI (Open MPI hands every rank a pseudo-terminal: mpipipe.metrics.interactive).
"""

from __future__ import annotations

import io
import os
import pty
import threading

import pytest

from mpipipe import launch
from mpipipe.metrics import interactive
from tests import mpirun

FLAGS = [*mpirun.TINY, "--steps", "6", "--eval-every", "0"]  # log lines at steps 1 and 6
BAR = "\r["  # the progress bar redraws its line


def test_interactive_trusts_isatty_outside_open_mpi():
    assert not interactive(io.StringIO(), {})
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert interactive(terminal, {})
    os.close(master)


@pytest.mark.parametrize("ranks", [None, 2])
def test_a_redirected_log_is_plain_text(tmp_path, ranks):
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        r = mpirun.train(ranks, *FLAGS, stdout=fh, timeout=60)
    text = log.read_text()
    assert r.returncode == 0, text + r.stderr
    assert "\r" not in text and "\033" not in text, repr(text[:600])
    steps = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/6", "step 6/6"], text


def _on_a_terminal(ranks: int | None) -> tuple[mpirun.Result, str]:
    """Train with standard output on a pseudo-terminal; return the result and what it showed."""
    master, slave = pty.openpty()
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        r = mpirun.train(ranks, *FLAGS, stdout=slave, timeout=60)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return r, b"".join(shown).decode(errors="replace")


@pytest.mark.parametrize("ranks", [None, 2])
def test_a_terminal_shows_a_progress_bar(ranks):
    r, screen = _on_a_terminal(ranks)
    assert r.returncode == 0, screen + r.stderr
    # MPICH's mpiexec hands ranks pipes: they cannot tell a terminal from a log, and print lines
    open_mpi = launch.family(launch.library_version()) == launch.OPEN_MPI
    assert (BAR in screen) == (ranks is None or open_mpi), repr(screen[-600:])
    assert "step 6/6" in screen
