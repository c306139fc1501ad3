"""The array namespace: the only module that imports NumPy for kernels or CuPy at all.

Kernels receive arrays and ask `namespace_of(a)` for their module, so one implementation runs on
NumPy (CPU) and CuPy (GPU). CuPy is optional: its absence is tolerated everywhere.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy

Array = Any  # numpy.ndarray or cupy.ndarray; kept loose so kernels stay backend-neutral

try:  # pragma: no cover - exercised only on GPU machines
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None

BACKENDS = ("numpy", "cupy")


def get(backend: str = "numpy") -> ModuleType:
    """Return the array module for `backend` ('numpy' or 'cupy')."""
    if backend == "numpy":
        return numpy
    if backend == "cupy":
        if _cupy is None:
            raise RuntimeError("--backend cupy needs CuPy (pip install 'mpipipe[gpu]') and a GPU")
        return _cupy
    raise ValueError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")


def namespace_of(a: Array) -> ModuleType:
    """The array module that owns `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):  # pragma: no cover
        return _cupy
    return numpy


def to_numpy(a: Array) -> numpy.ndarray:
    """A host (NumPy) copy or view of `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):  # pragma: no cover
        return _cupy.asnumpy(a)
    return numpy.asarray(a)


def scatter_add(target: Array, index: Array, values: Array) -> None:
    """target[index[i]] += values[i] for every i, in order (repeated indices accumulate)."""
    xp = namespace_of(target)
    if xp is numpy:
        numpy.add.at(target, index, values)
    else:  # pragma: no cover
        import cupyx  # noqa: PLC0415 - only reachable with CuPy present

        cupyx.scatter_add(target, index, values)


def dtype_of(name: str) -> numpy.dtype:
    """NumPy dtype for a config name: 'float32' | 'float64'."""
    if name not in ("float32", "float64"):
        raise ValueError(f"--dtype {name} is not supported (choose float32 or float64)")
    return numpy.dtype(name)
