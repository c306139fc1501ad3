"""cupyx of the fake: pinned host buffers (counted) and the legacy scatter_add."""

from __future__ import annotations

from importlib import import_module
from typing import Any

import numpy as np

# the sibling fake `cupy`, whether loaded as `cupyx` or as `tests.fakegpu.cupyx`
cupy = import_module(__name__.rpartition(".")[0] + ".cupy" if "." in __name__ else "cupy")

__all__ = ["empty_pinned", "scatter_add", "zeros_pinned"]


def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    """A host array in (fake) page-locked memory: copies from and to it are truly asynchronous."""
    return cupy._fake.pin(np.empty(shape, dtype, order=order))


def zeros_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    a = empty_pinned(shape, dtype, order)
    a[...] = 0
    return a


def scatter_add(a: Any, slices: Any, value: Any) -> None:
    """a[slices] += value with repeated indices accumulating (deprecated: use cupy.add.at)."""
    cupy.add.at(a, slices, value)
