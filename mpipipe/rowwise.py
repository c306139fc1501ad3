"""Element-wise and row-wise work on all the cores a rank owns: blocks of rows on a thread pool.

Kernels hand their element-wise chains (GELU, LayerNorm, the causal softmax, the optimizer's
update) to `map_rows` / `each_rows` as a function of whole arrays. The backend decides how it
runs: on NumPy with more than one thread, the arrays' leading axis is cut into one contiguous
block per thread and the function runs on each block at once (NumPy releases the GIL inside its
loops); on CuPy, on one thread, or for small arrays, it is called once on the whole arrays,
exactly as the kernel would have called it itself.

Why blocks of rows: each row's arithmetic is the same operations on the same elements in the
same order whatever block it falls in (element-wise operations, and reductions along the last
axis, which NumPy sums row by row), so the threaded result is bitwise the one-call result, and
the one-call result is what the CuPy path (and the fake CuPy of the tests) computes. A fused
expression library (numexpr) was measured instead and rejected: its float32 tanh is 9x slower
than NumPy's, its exp and tanh differ from NumPy's in the last bits, and it has no fp16/bf16
(`python benchmarks/bench_cores.py`; README, #18).

The number of threads is the rank's BLAS thread count (what `runtime.share_cores` gave it from
its cores, or what OMP_NUM_THREADS / OPENBLAS_NUM_THREADS said), set once per process by
`use_threads`; the default, 1, is the one-call behaviour. BLAS and these threads never run at
once: a kernel's products finish before its element-wise work starts, so the two pools take
turns on the same cores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy
from threadpoolctl import threadpool_info

from mpipipe.xp import Array

MIN_BLOCK = 1 << 15  # elements per block below which a thread costs more than it saves

_pool: ThreadPoolExecutor | None = None
_threads = 1


def blas_threads() -> int:
    """The threads the loaded BLAS libraries use (1 if none is found)."""
    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts, default=1)


def use_threads(n: int) -> None:
    """Run element-wise work on `n` threads from now on (1: one call, no pool)."""
    global _pool, _threads
    if n < 1:
        raise ValueError(f"element-wise threads must be at least 1, got {n}")
    if n == _threads:
        return
    if _pool is not None:
        _pool.shutdown()
    _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="rowwise") if n > 1 else None
    _threads = n


def threads() -> int:
    """The element-wise threads in use."""
    return _threads


def _bounds(arrays: Sequence[Array]) -> list[tuple[int, int]] | None:
    """Row ranges [i0, i1), one per thread, or None when the work stays one call."""
    if _pool is None or not all(isinstance(a, numpy.ndarray) for a in arrays):
        return None  # one thread, or not NumPy (CuPy runs its own kernels)
    rows = arrays[0].shape[0] if arrays[0].ndim else 0
    if any(a.ndim == 0 or a.shape[0] != rows for a in arrays):
        raise ValueError(
            "map_rows / each_rows need arrays with one leading axis: got shapes "
            f"{[a.shape for a in arrays]}"
        )
    n = min(_threads, rows, arrays[0].size // MIN_BLOCK)
    if n < 2:
        return None
    cuts = [rows * i // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _run(blocks: list[tuple[int, int]], work: Callable[[int, int], None]) -> None:
    """work(i0, i1) for every block: the first on this thread, the others on the pool."""
    assert _pool is not None
    futures: list[Future[None]] = [_pool.submit(work, i0, i1) for i0, i1 in blocks[1:]]
    try:
        work(*blocks[0])
    finally:
        for f in futures:
            f.result()  # waits for every block; re-raises a worker's exception


def each_rows(fn: Callable[..., None], *arrays: Array) -> None:
    """fn(*blocks) for blocks of rows of `arrays` (which share their leading axis): for work
    done in place (fn returns nothing)."""
    blocks = _bounds(arrays)
    if blocks is None:
        fn(*arrays)
        return
    _run(blocks, lambda i0, i1: fn(*(a[i0:i1] for a in arrays)))


def map_rows(fn: Callable[..., Any], *arrays: Array) -> Any:
    """fn(*arrays), computed block of rows by block of rows: fn returns an array or a tuple of
    arrays whose leading axis is the inputs' rows. With one block this IS fn(*arrays); with
    several, each block's results are copied into arrays of this thread's block's dtypes (each
    thread copies its own block, once this thread has allocated them)."""
    blocks = _bounds(arrays)
    if blocks is None:
        return fn(*arrays)
    rows = arrays[0].shape[0]
    outs: list[Array] = []
    ready = threading.Event()

    def place(j0: int, j1: int, got: Any) -> None:
        for o, p in zip(outs, got if isinstance(got, tuple) else (got,), strict=True):
            o[j0:j1] = p

    def work(j0: int, j1: int) -> None:
        got = fn(*(a[j0:j1] for a in arrays))
        ready.wait()
        if outs:  # empty when this thread's block failed: its exception is the one raised
            place(j0, j1, got)

    assert _pool is not None
    futures = [_pool.submit(work, j0, j1) for j0, j1 in blocks[1:]]
    i0, i1 = blocks[0]
    try:
        first = fn(*(a[i0:i1] for a in arrays))
        parts = first if isinstance(first, tuple) else (first,)
        outs.extend(numpy.empty((rows, *p.shape[1:]), dtype=p.dtype) for p in parts)
        ready.set()
        place(i0, i1, first)
    finally:
        ready.set()
        for f in futures:
            f.result()  # waits for every block; re-raises a worker's exception
    return tuple(outs) if isinstance(first, tuple) else outs[0]
