"""Element-wise and row-wise work on all the cores a rank owns: blocks of rows on a thread pool.

Kernels hand their element-wise chains (GELU, LayerNorm, the causal softmax, the optimizers'
updates) to `map_rows` / `each_rows` as a function of whole arrays. The backend decides how it
runs: on NumPy, the arrays' leading axis is cut into blocks of about `BLOCK` elements (at least
one per thread), so that a chain of passes (GELU's nine, AdamW's ten) reads and writes the
core's cache instead of memory, and the rank's threads take the blocks in turn, each the next
one nobody took (NumPy releases the GIL inside its loops). On CuPy, or with blocks switched off
on one thread (`use_threads(1, block=0)`), it is one call on the whole arrays, exactly as the
kernel would have made it itself.

Why blocks of rows: each row's arithmetic is the same operations on the same elements in the
same order whatever block it falls in (element-wise operations, and reductions along the last
axis, which NumPy does row by row), so the result is bitwise the one-call result, which is what
the CuPy path (and the fake CuPy of the tests) computes. A fused-expression library (numexpr)
was measured instead and rejected: its float32 tanh is several times slower than NumPy's, its
exp and tanh differ from NumPy's in the last bits (so the CPU and GPU paths would no longer
agree bitwise), and it has no fp16/bf16 (`python benchmarks/bench_cores.py`; README, #18).

The number of threads is the rank's BLAS thread count (what `runtime.share_cores` gave it from
its cores, or what OMP_NUM_THREADS / OPENBLAS_NUM_THREADS said), set once per process by
`use_threads`. BLAS and these threads take turns on the same cores: a kernel's products finish
before its element-wise work starts (but OpenBLAS's idle threads spin for a while after a
product: taking blocks in turn lets the threads that do not share a core with one take more).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy
from threadpoolctl import threadpool_info

from mpipipe.xp import Array

BLOCK = 1 << 17  # elements of a block (of the first array): it and its temporaries stay cached
MIN_SHARE = 1 << 15  # elements per thread below which another thread costs more than it saves

# the variables through which a user sets the BLAS's threads (the runtime then leaves them be)
USER_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_pool: ThreadPoolExecutor | None = None
_threads, _block = 1, BLOCK


def blas_threads() -> int:
    """The threads the loaded BLAS libraries use (1 if none is found)."""
    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts, default=1)


def use_threads(n: int, block: int = BLOCK) -> None:
    """Run element-wise work on `n` threads from now on, each in blocks of about `block`
    elements (0: no blocks; with n = 1, one call on the whole arrays: no pool, no copies)."""
    global _pool, _threads, _block
    if n < 1 or block < 0:
        raise ValueError(f"element-wise threads must be >= 1 and block >= 0, got {n} and {block}")
    _block = block
    if n == _threads:
        return
    if _pool is not None:
        _pool.shutdown()
    _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="rowwise") if n > 1 else None
    _threads = n


def threads() -> int:
    """The element-wise threads in use."""
    return _threads


@contextmanager
def alone() -> Iterator[None]:
    """Element-wise work on the calling thread only while inside (in blocks, as before): for
    callers that keep every core busy with threads of their own (mbthreads.py)."""
    global _threads
    saved, _threads = _threads, 1
    try:
        yield
    finally:
        _threads = saved


Rows = list[tuple[int, int]]  # row ranges [i0, i1)


def _split(arrays: Sequence[Array]) -> tuple[int, Rows] | None:
    """(threads, blocks of rows), or None when the work stays one call."""
    if not all(isinstance(a, numpy.ndarray) for a in arrays):
        return None  # not NumPy: CuPy runs its own kernels, on the whole arrays
    rows = arrays[0].shape[0] if arrays[0].ndim else 0
    if any(a.ndim == 0 or a.shape[0] != rows for a in arrays):
        raise ValueError(
            "map_rows / each_rows need arrays with one leading axis: got shapes "
            f"{[a.shape for a in arrays]}"
        )
    size = arrays[0].size
    n = max(1, min(_threads, rows, size // MIN_SHARE))
    step = max(1, _block * rows // size) if _block and size else rows  # rows per block
    step = min(step, -(-rows // n))  # at least one block per thread
    if step >= rows:
        return None
    return n, [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _run(n: int, blocks: Rows, work: Callable[[int, int], None]) -> None:
    """work(i0, i1) for every block, on this thread and n - 1 of the pool's: each takes the
    next block nobody took yet, so a thread that runs slower (one whose core a BLAS thread,
    still spinning after a product, shares) takes fewer."""
    taken = itertools.count()  # next() is atomic: one C call under the GIL

    def run() -> None:
        while (i := next(taken)) < len(blocks):
            work(*blocks[i])

    futures: list[Future[None]] = []
    if n > 1:
        assert _pool is not None
        futures = [_pool.submit(run) for _ in range(n - 1)]
    try:
        run()
    finally:
        for f in futures:
            if not f.cancel():  # a worker not yet started has nothing left: never wait for it
                f.result()  # waits for the worker's last block; re-raises its exception


def each_rows(fn: Callable[..., None], *arrays: Array) -> None:
    """fn(*blocks) for blocks of rows of `arrays` (which share their leading axis): for work
    done in place (fn returns nothing)."""
    split = _split(arrays)
    if split is None:
        fn(*arrays)
        return
    _run(*split, lambda i0, i1: fn(*(a[i0:i1] for a in arrays)))


def map_rows(fn: Callable[..., Any], *arrays: Array) -> Any:
    """fn(*arrays), computed block of rows by block of rows: fn returns an array or a tuple of
    arrays whose leading axis is the inputs' rows. With one block this IS fn(*arrays); with
    several, each block's results are copied into arrays of the first block's dtypes (which
    the thread that ran it allocates; the others wait for them after their first block)."""
    split = _split(arrays)
    if split is None:
        return fn(*arrays)
    rows = arrays[0].shape[0]
    outs: list[Array] = []
    single: list[bool] = []  # whether fn returned one array, not a tuple: from the first block
    ready = threading.Event()
    first = split[1][0]

    def work(i0: int, i1: int) -> None:
        try:
            got = fn(*(a[i0:i1] for a in arrays))
            if (i0, i1) == first:
                single.append(not isinstance(got, tuple))
                pieces = (got,) if single[0] else got
                outs.extend(numpy.empty((rows, *p.shape[1:]), dtype=p.dtype) for p in pieces)
        finally:
            if (i0, i1) == first:
                ready.set()  # also when it failed: no thread may wait for it forever
        ready.wait()
        if not outs:
            return  # the first block failed: its exception is the one raised
        for o, p in zip(outs, (got,) if single[0] else got, strict=True):
            o[i0:i1] = p

    _run(*split, work)
    return outs[0] if single[0] else tuple(outs)


def add(a: Array, b: Array) -> Array:
    """a + b as a fresh array, over blocks of rows when both are NumPy arrays of one shape (the
    residual connections); otherwise simply a + b."""
    if not (isinstance(a, numpy.ndarray) and isinstance(b, numpy.ndarray)) or a.shape != b.shape:
        return a + b
    out = numpy.empty(a.shape, numpy.result_type(a, b))
    rows = (-1, a.shape[-1]) if a.ndim else (1, 1)
    each_rows(
        lambda x, y, o: numpy.add(x, y, out=o), a.reshape(rows), b.reshape(rows), out.reshape(rows)
    )
    return out
