"""The array namespace: the only module that imports NumPy for kernels or CuPy at all.

Kernels receive arrays and ask `namespace_of(a)` for their module, so one implementation runs on
NumPy (CPU) and CuPy (GPU). CuPy is optional: its absence is tolerated everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy

Array = Any  # numpy.ndarray or cupy.ndarray; kept loose so kernels stay backend-neutral

try:  # pragma: no cover - exercised only on GPU machines
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None

BACKENDS = ("numpy", "cupy")


def gpu_count() -> int:
    """GPUs CuPy can see (0 without CuPy or without a working CUDA runtime)."""
    if _cupy is None:
        return 0
    try:  # pragma: no cover - needs a GPU
        return int(_cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA encodes 13.0 as 13000


def cuda_versions() -> str:
    """CuPy's version and the CUDA runtime and driver it found, for `doctor`."""
    if _cupy is None:
        return "CuPy not installed"
    try:  # pragma: no cover - needs CuPy
        rt = _cupy.cuda.runtime.runtimeGetVersion()
        drv = _cupy.cuda.runtime.driverGetVersion()
    except Exception as e:  # pragma: no cover
        return f"CuPy {_cupy.__version__}, no usable CUDA ({type(e).__name__})"
    return (
        f"CuPy {_cupy.__version__}, CUDA runtime {_cuda_version(rt)}, driver {_cuda_version(drv)}"
    )


def gpu_name(index: int) -> str:
    """The name of GPU `index` (as CUDA reports it)."""
    assert _cupy is not None
    name = _cupy.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def resolve_backend(name: str) -> tuple[str, str]:
    """('numpy' | 'cupy', why) for --backend auto|numpy|cupy."""
    if name == "auto":
        n = gpu_count()
        if n:
            return "cupy", f"auto: CuPy sees {n} GPU(s)"  # pragma: no cover
        why = "CuPy is not installed" if _cupy is None else "CuPy sees no GPU"
        return "numpy", f"auto: {why}"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose auto, numpy or cupy)")
    return name, f"--backend {name}"


def pick_device(local_rank: int, local_size: int, n_devices: int, shared: bool) -> int:
    """The GPU of a rank: its node-local rank modulo the GPUs visible. More ranks than GPUs on a
    node is an error unless sharing was asked for (--share-gpus yes)."""
    if n_devices < 1:
        raise ValueError("--backend cupy but no GPU is visible on this node")
    if local_size > n_devices and not shared:
        raise ValueError(
            f"{local_size} ranks on this node but {n_devices} GPU(s): launch at most "
            f"{n_devices} ranks per node, or pass --share-gpus yes to put several on one GPU"
        )
    return local_rank % n_devices


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> numpy.ndarray:  # pragma: no cover
    """A host array in page-locked memory (fast, asynchronous copies to and from the GPU)."""
    import cupyx  # noqa: PLC0415 - only reachable with CuPy present

    return cupyx.empty_pinned(shape, dtype=dtype)


def use_device(index: int) -> None:  # pragma: no cover - needs a GPU
    """Make GPU `index` current for this process (CuPy allocations and kernels)."""
    assert _cupy is not None
    _cupy.cuda.Device(index).use()


def get(backend: str = "numpy") -> ModuleType:
    """Return the array module for `backend` ('numpy' or 'cupy')."""
    if backend == "numpy":
        return numpy
    if backend == "cupy":
        if _cupy is None:
            raise RuntimeError(
                "--backend cupy needs CuPy and a GPU (pip install 'mpipipe[cuda12]', or"
                " 'mpipipe[cuda13]' for CUDA 13)"
            )
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


def to_host(values: list[Array]) -> list[float]:
    """Device scalars as Python floats, brought to the host in ONE transfer (one sync)."""
    if not values:
        return []
    xp = namespace_of(values[0])
    return [float(v) for v in to_numpy(xp.stack(values))]


def copy_into(target: Array, host: numpy.ndarray) -> None:
    """target[...] = host, for a target on any device: the explicit host-to-device copy CuPy
    asks for (it refuses to fill a device array from a NumPy array), a plain copy on NumPy."""
    xp = namespace_of(target)
    if xp is numpy:
        target[...] = host
    else:
        target[...] = xp.asarray(host, dtype=target.dtype)


def scatter_add(target: Array, index: Array, values: Array) -> None:
    """target[index[i]] += values[i] for every i, in order (repeated indices accumulate)."""
    xp = namespace_of(target)
    if not is_half(target.dtype):
        _add_at(xp, target, index, values)
        return
    # 16-bit targets sum in a float32 array: CuPy's add.at has no bfloat16, and a token repeated
    # n times would otherwise be rounded to 8 (bf16) or 11 (fp16) bits n times
    total = xp.zeros(target.shape, dtype="float32")
    _add_at(xp, total, index, values.astype("float32"))
    target += total.astype(target.dtype)


ROUND_MIN = 8  # indices taking part below which a round costs more than adding them one by one


def _add_at(xp: ModuleType, target: Array, index: Array, values: Array) -> None:
    """`xp.add.at(target, index, values)` (rows of `values` into rows of `target`), and on NumPy
    the same bits faster. NumPy's add.at adds row after row (9.1 ms for 2048 rows of 256 float32
    with a text's byte tokens, one thread); here the k-th occurrences of every index go in one
    fancy-indexed add (no index twice in it), round after round while at least ROUND_MIN
    indices take part, and an index with more occurrences adds the rest in order through one
    `add.accumulate`: each row of `target` still receives its additions one at a time, in the
    order of occurrence, so every sum rounds as add.at's does."""
    if not (
        xp is numpy
        and isinstance(index, numpy.ndarray)
        and index.ndim == 1
        and index.dtype.kind in "iu"  # integers: a boolean index is a mask to add.at
        and values.dtype == target.dtype
        and values.ndim == 2
        and index.size == values.shape[0] > 0
        and index.min() >= 0  # -1 and V - 1 are one row to add.at, two groups here
    ):
        xp.add.at(target, index, values)  # CuPy 13+: cupy.add.at
        return
    order = numpy.argsort(index, kind="stable")  # grouped by index, each in order of occurrence
    grouped = index[order]
    first = numpy.flatnonzero(numpy.r_[True, grouped[1:] != grouped[:-1]])  # each group's start
    counts = numpy.diff(numpy.r_[first, grouped.size])
    rank = numpy.arange(grouped.size) - numpy.repeat(first, counts)  # occurrence number
    taking_part = numpy.bincount(rank)  # how many indices have a k-th occurrence
    few = numpy.flatnonzero(taking_part < ROUND_MIN)  # taking_part never grows with k
    rounds = int(few[0]) if few.size else len(taking_part)
    by_rank = order[numpy.argsort(rank, kind="stable")]  # first occurrences, then second, ...
    start = 0
    for n in taking_part[:rounds]:
        rows = by_rank[start : start + n]
        target[index[rows]] += values[rows]
        start += n
    for g in numpy.flatnonzero(counts > rounds):  # the few indices with more occurrences
        rows = order[first[g] + rounds : first[g] + counts[g]]
        i = grouped[first[g]]
        target[i] = numpy.add.accumulate(numpy.concatenate([target[i][None], values[rows]]))[-1]


def best_seconds(xp: ModuleType, work: Any, repeats: int = 3) -> tuple[float, str]:
    """The best time of `work()` over `repeats` runs (after one warm-up), on the backend's own
    clock: CUDA events around the GPU's work on CuPy (the host only queues it), perf_counter on
    NumPy; and the clock's name."""
    best, clock = seconds_each(xp, [work], repeats)
    return best[0], clock


def seconds_each(
    xp: ModuleType,
    parts: Sequence[Any],
    repeats: int = 3,
    summary: Callable[[list[float]], float] = min,
) -> tuple[list[float], str]:
    """`summary` (the best, by default) of each of `parts`' times (called in order, `repeats`
    times after one warm-up round, so a part may use what the one before it left), on the
    backend's clock; and the clock's name."""
    import time

    for part in parts:
        part()
    times: list[list[float]] = [[] for _ in parts]
    for _ in range(repeats):
        for k, part in enumerate(parts):
            if xp is numpy:
                t0 = time.perf_counter()
                part()
                times[k].append(time.perf_counter() - t0)
            else:
                start, end = xp.cuda.Event(), xp.cuda.Event()
                start.record()
                part()
                end.record()
                end.synchronize()
                times[k].append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    return [summary(t) for t in times], "perf_counter" if xp is numpy else "CUDA events"


def dtype_of(name: str) -> numpy.dtype:
    """The compute dtype for a config name: float32 | float64 | fp16 (float16) | bf16 (bfloat16,
    the ml_dtypes type that NumPy and CuPy 14 both use)."""
    if name == "bf16":
        return bfloat16()
    names = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp16": "float16"}
    if name not in names:
        raise ValueError(
            f"--dtype {name} is not supported (choose float32, float64, fp16 or bf16)"
        )
    return numpy.dtype(names[name])


def bfloat16() -> numpy.dtype:
    """NumPy's dtype for bfloat16: NumPy has none of its own, the ml_dtypes package adds it."""
    try:
        import ml_dtypes  # noqa: PLC0415 - only --dtype bf16 needs it
    except ImportError:
        raise RuntimeError(
            "--dtype bf16 needs the ml_dtypes package, which gives NumPy and CuPy their "
            "bfloat16 (pip install ml_dtypes)"
        ) from None
    return numpy.dtype(ml_dtypes.bfloat16)


def is_half(dtype: Any) -> bool:
    """A 16-bit float: float16 or bfloat16 (whose NumPy kind is 'V', not 'f': ml_dtypes
    registers it as a user type, so `kind == "f"` alone misses it)."""
    d = numpy.dtype(dtype)
    return d.itemsize == 2 and (d.kind == "f" or d.name == "bfloat16")


def wide_dtype(dtype: Any) -> Any:
    """The dtype `widen` gives an array of `dtype`: float32 for a 16-bit float, else `dtype`."""
    return numpy.dtype("float32") if is_half(dtype) else numpy.dtype(dtype)


def widen(a: Array) -> Array:
    """`a` in float32 if it is a 16-bit float, else `a` itself (no copy): what kernels compute
    softmax, LayerNorm statistics, sums over rows and the loss in."""
    return a.astype("float32") if is_half(a.dtype) else a


def storable(a: Array) -> numpy.ndarray:
    """A host copy of `a` that HDF5 stores as a float: bfloat16 widened to float32 (exact: every
    bfloat16 is a float32), since h5py knows no bfloat16 (it would write opaque 2-byte records)
    and NumPy cannot hash its buffer. Every other dtype is returned as `to_numpy` gives it."""
    host = to_numpy(a)
    return host.astype("float32") if host.dtype.name == "bfloat16" else host


def overflow_to_inf(xp: ModuleType) -> contextlib.AbstractContextManager[Any]:
    """Where a kernel means exp's overflow to inf (its limit is the result): NumPy's warning off
    inside (CuPy does not warn)."""
    return numpy.errstate(over="ignore") if xp is numpy else contextlib.nullcontext()
