"""Which `mpiexec` starts our ranks, and the settings its MPI needs: one place for the tests, the
benchmarks and `mpipipe study`.

The launcher must belong to the MPI library that mpi4py loads: an MPICH `mpiexec` starting
ranks linked to Open MPI (or the reverse) gives N singletons that never meet, or a hang. So the
library is asked for its version (in a child process, without initializing MPI here), and the
first candidate whose own `--version` names the same family wins. Candidates, in order: the
`mpiexec` beside this Python (the `mpich` wheel puts one there), then `mpiexec`, `mpirun` and
Debian's per-family names on PATH. A family we do not recognize on either side is not judged.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mpipipe.errors import ConfigError

MPICH, OPEN_MPI, UNKNOWN = "MPICH", "Open MPI", "unknown"

# Words that name a family in a library version or an `mpiexec --version`. Intel MPI and
# MVAPICH derive from MPICH and launch with its Hydra; Open MPI 4 says OpenRTE, 5 says Open MPI.
FAMILY_WORDS = {
    OPEN_MPI: ("Open MPI", "OpenRTE"),
    MPICH: ("MPICH", "HYDRA", "Intel(R) MPI", "MVAPICH"),
}

# Open MPI's settings, as environment variables so that every launch path (mpiexec, and ranks
# started by srun) sees them; a value already in the environment wins.
OPEN_MPI_ENV = {
    # more ranks than cores: the tests run 16 ranks on 2 cores, emulated studies even more
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    # a rank waiting for a message yields its core instead of spinning: when ranks share cores,
    # spinning starves the rank being waited for (a 4-rank step on 2 cores took twice as long)
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
# Open MPI refuses to start as root unless told twice; containers and CI run as root.
OPEN_MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

_ASK_LIBRARY = (
    "import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; "
    "from mpi4py import MPI; print(MPI.Get_library_version())"
)


@dataclass(frozen=True)
class Launcher:
    """An `mpiexec` and the MPI family it belongs to."""

    mpiexec: str
    family: str

    def command(self, n: int) -> list[str]:
        return [self.mpiexec, "-n", str(n)]


def family(version: str) -> str:
    """MPICH, Open MPI or unknown, from a library version or an `mpiexec --version` text."""
    for name, words in FAMILY_WORDS.items():
        if any(w.lower() in version.lower() for w in words):
            return name
    return UNKNOWN


@functools.cache
def library_version() -> str:
    """The version string of the MPI library mpi4py loads here ("" if it cannot be asked)."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", _ASK_LIBRARY], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.replace("\0", "").strip() if r.returncode == 0 else ""


def _launcher_family(exe: str) -> str:
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN
    return family(r.stdout + r.stderr)


def _candidates() -> list[str]:
    beside = Path(sys.executable).parent / "mpiexec"
    found = [str(beside)] if beside.exists() else []
    for name in ("mpiexec", "mpirun", "mpiexec.openmpi", "mpiexec.mpich", "mpiexec.hydra"):
        path = shutil.which(name)
        if path and path not in found:
            found.append(path)
    return found


@functools.cache
def find() -> Launcher:
    """The `mpiexec` of the MPI library mpi4py loads; ConfigError naming what was found if none
    matches."""
    want = family(library_version())
    seen = []
    for exe in _candidates():
        have = _launcher_family(exe)
        if UNKNOWN in (want, have) or have == want:
            return Launcher(exe, have if have != UNKNOWN else want)
        seen.append(f"{exe} ({have})")
    library = library_version().splitlines()[0] if library_version() else "unknown"
    if not seen:
        raise ConfigError(
            f"no mpiexec found for the MPI library mpi4py uses ({library}): install that MPI's "
            "launcher, or `pip install mpich` with the mpi4py wheel (pip install 'mpipipe[mpi]')"
        )
    raise ConfigError(
        f"no mpiexec matches the MPI library mpi4py uses ({library}); found {', '.join(seen)}. "
        f"Put the {want} launcher first on PATH, or build mpi4py against the MPI whose mpiexec "
        "you use: MPICC=/path/to/mpicc pip install --no-binary=mpi4py mpi4py"
    )


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) plus the settings the loaded MPI library needs to start ranks
    on this machine; values already in `base` win."""
    env = dict(os.environ if base is None else base)
    if family(library_version()) == OPEN_MPI:
        settings = dict(OPEN_MPI_ENV)
        if os.geteuid() == 0:
            settings.update(OPEN_MPI_ROOT_ENV)
        env = {**settings, **env}
    return env
