"""Several micro-batches at once on one rank's cores: the single process that uses its cores.

A process that holds the whole model (pp = dp = tp = 1) and owns several cores can run its
BLAS on all of them, but then the element-wise work between products, NumPy's per-call cost and
the Python in between run on one core, and OpenBLAS's idle threads spin on the others. Two
pipeline ranks of one thread each do better (measured: 1.49x faster, README #18) because each
runs whole actions on its own core. `MicroBatchThreads` does that inside one process: each of
its `threads` workers takes the next micro-batch nobody took and runs its forward (and loss),
input gradient and weight gradient, with one BLAS thread and its element-wise work on its own
thread (NumPy releases the GIL inside its loops and products).

Bitwise the serial run: a micro-batch's forward and input gradient read only the parameters and
its own data; the weight gradients accumulate (`grad += ...`) in the order the plan's row would
have added them. Each gradient buffer has a turnstile: the contributions of the (micro-batch,
layer) pairs that write it are numbered in the row's order, and each waits for its number, so a
worker's W of layer j for micro-batch 3 runs as soon as micro-batch 2's W of layer j is done,
while micro-batch 2 goes on to layer j - 1 (layers sharing a buffer share a turnstile). For the
built-in layers only the additions wait: W's products run at once, their results held back
(kernels/accumulate.py) and added at the turn; a layer whose W adds some other way (a user's)
runs its whole W at its turn. The
hooks that a layer's final gradient starts (tied sums, gradient buckets) run after the workers,
on the calling thread, in the row's order. Memory: up to `threads` micro-batches' saved
activations at once instead of the row's peak.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from threadpoolctl import ThreadpoolController

from mpipipe import rowwise
from mpipipe.executor import Executor, MicroBatches
from mpipipe.kernels import accumulate
from mpipipe.schedule import Action
from mpipipe.stage import Chunk
from mpipipe.xp import to_host

Key = TypeVar("Key", bound=Hashable)

# Python hands the GIL to a thread that asks for it after this long at the most (default 5 ms).
# A worker back from a product or loop (run without the GIL) waits for the GIL while another runs
# Python; at 5 ms those waits made the default model's step (d_model 128) slower threaded than
# one micro-batch at a time (780-950 against 630 ms); at 0.2 ms it takes 0.61 of it
# (`python benchmarks/bench_cores.py --skip-kernels`, README #18).
SWITCH_S = 0.0002


class Turnstile:
    """Numbered turns: `enter(n)` waits until turns 0..n-1 have `leave()`-d. A failure anywhere
    `break_()`s every turnstile, so no worker waits for a turn that will never come."""

    def __init__(self) -> None:
        self.turn, self.broken = 0, False
        self.cond = threading.Condition()

    def enter(self, n: int) -> None:
        with self.cond:
            while self.turn != n and not self.broken:
                self.cond.wait()
            if self.broken:
                raise _Broken

    def leave(self) -> None:
        with self.cond:
            self.turn += 1
            self.cond.notify_all()

    def break_(self) -> None:
        with self.cond:
            self.broken = True
            self.cond.notify_all()


class _Broken(Exception):
    """Another worker failed: this one stops (the other's exception is the one raised)."""


def applies(n_ranks: int, backend: str, emulated: bool, threads: int, microbatches: int) -> bool:
    """Whether a run may take micro-batches on threads: one rank holding the whole model (no
    messages and no collectives inside a step), real compute on NumPy, several cores and
    micro-batches."""
    return n_ranks == 1 and backend == "numpy" and not emulated and threads > 1 < microbatches


def threads_for(job: Any, n_ranks: int, backend: str, cores: int) -> int:
    """The micro-batches a run of `job` on `n_ranks` takes at once on `cores` cores (one per
    worker, no more workers than micro-batches), or 0 when it runs its row serially."""
    m = job.plan.microbatches
    on = job.cfg.microbatch_threads == "auto"
    return (
        min(cores, m)
        if on and applies(n_ranks, backend, job.emulated is not None, cores, m)
        else 0
    )


def cores(env: Mapping[str, str] = os.environ) -> int:
    """The cores `runtime.place` will give a lone rank (the user's OMP_NUM_THREADS and friends,
    else the cores it may run on): for the dry run, before any thread is placed."""
    user = any(v in env for v in rowwise.USER_THREADS)
    return rowwise.blas_threads() if user else len(os.sched_getaffinity(0))


def share_groups(grads: Mapping[Key, Sequence[Any]]) -> dict[Key, int]:
    """Group 0, 1, ... of each key (a layer) such that keys whose arrays (gradient buffers)
    share one are in one group: they take their W turns through one turnstile."""
    parent = {k: k for k in grads}

    def root(k: Key) -> Key:
        while parent[k] != k:
            k = parent[k]
        return k

    first: dict[int, Key] = {}  # id(array) -> the first key holding it
    for k, arrays in grads.items():
        for a in arrays:
            if id(a) in first:
                parent[root(k)] = root(first[id(a)])
            else:
                first[id(a)] = k
    roots = list(dict.fromkeys(root(k) for k in grads))  # in the keys' order
    return {k: roots.index(root(k)) for k in grads}


class MicroBatchThreads(Executor):
    """The Executor's run of a one-rank row, with micro-batches on `threads` workers."""

    def __init__(self, *args: Any, threads: int, **kwargs: Any) -> None:
        self.local = threading.local()  # each worker's action not yet accounted (`unsettled`)
        super().__init__(*args, **kwargs)
        if self.wire or not all(isinstance(c, Chunk) for c in self.stage.chunks):
            raise ValueError("micro-batch threads need one rank holding the model, real layers")
        self.threads = threads
        self.blas = ThreadpoolController()
        self.actions = {(a.kind, a.mb, a.chunk): (a, i) for i, a in enumerate(self.row)}
        self.mbs = sorted({a.mb for a in self.row if a.kind == "F"})
        group = share_groups(
            {
                (c, j): list(layer.grads.values())
                for c, ch in enumerate(self.stage.chunks)
                for j, layer in enumerate(ch.layers)
            }
        )
        # the row's order of W contributions, numbered per group
        self.ticket: dict[tuple[int, int, int], tuple[int, int]] = {}  # (mb, c, j) -> (g, n)
        counts: dict[int, int] = {}
        for a in self.row:
            if a.kind == "W":
                for j in reversed(range(len(self.stage.chunks[a.chunk].layers))):
                    g = group[(a.chunk, j)]
                    self.ticket[(a.mb, a.chunk, j)] = (g, counts.get(g, 0))
                    counts[g] = counts.get(g, 0) + 1
        self.n_groups = len(set(group.values()))
        # layers whose W's additions can be held back: their products run outside the turn
        self.hold = [[accumulate.holds_adds(x) for x in c.layers] for c in self.stage.chunks]
        self.finals = [  # global layers, in the order the row's final W's complete them
            self.stage.chunks[c].indices[j]
            for c in sorted(self.final_w, key=self.final_w.__getitem__)
            for j in reversed(range(len(self.stage.chunks[c].layers)))
        ]
        self.order = sorted(range(len(self.stage.chunks)), key=lambda c: self.stage.ids[c])
        self.lock = threading.Lock()  # the spans, waits and memory accounting
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="microbatch")

    @property
    def unsettled(self) -> Any:
        """The executor's action whose memory accounting is pending, one per worker."""
        return getattr(self.local, "unsettled", None)

    @unsettled.setter
    def unsettled(self, value: Any) -> None:
        self.local.unsettled = value

    @property
    def lanes(self) -> list[int]:
        """The worker (trace track) of each of the last run's spans."""
        return self._lanes

    @property
    def busy(self) -> float:
        """Seconds of compute in the last run, per worker (so that 1 - busy / wall is idle)."""
        return super().busy / self.threads

    def run(self, batch: MicroBatches) -> list[float]:
        self.batch = batch
        self.ctx, self.wctx, self.mail = {}, {}, {}
        self.losses, self.outputs = {}, {}
        self.spans, self.waits = [], []
        self._lanes: list[int] = []  # each span's worker
        self.gates = [Turnstile() for _ in range(self.n_groups)]
        taken = itertools.count()  # next() is one C call: atomic under the GIL
        self.started = time.perf_counter()

        def worker(lane: int) -> None:
            try:
                while (i := next(taken)) < len(self.mbs):
                    self._microbatch(self.mbs[i], lane)
            except _Broken:
                pass
            except BaseException:
                for gate in self.gates:
                    gate.break_()
                raise

        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_S))
        try:
            self._work(worker)
        finally:
            sys.setswitchinterval(switch)
        if self.on_layer_final is not None and self.training:
            for layer in self.finals:
                self.on_layer_final(layer)
        self.finished = time.perf_counter()
        return to_host([self.losses[mb] for mb in sorted(self.losses)])

    def _work(self, worker: Callable[[int], None]) -> None:
        """worker(0) here and worker(1..threads-1) on the pool, with one BLAS thread each and
        the element-wise work on the worker's own thread."""
        with self.blas.limit(limits=1, user_api="blas"), rowwise.alone():
            futures: list[Future[None]] = [
                self.pool.submit(worker, lane) for lane in range(1, self.threads)
            ]
            try:
                worker(0)
            finally:
                for f in futures:
                    f.result()

    def _microbatch(self, mb: int, lane: int) -> None:
        """F (and the loss), B and W of one micro-batch through every chunk, in stage order, on
        worker `lane`."""
        for c in self.order:
            self._timed(("F", mb, c), self._forward, lane)
        if not self.training:
            return
        for c in reversed(self.order):
            self._timed(("B", mb, c), self._backward_input, lane)
            self._timed(("W", mb, c), self._weights, lane)

    def _timed(
        self, key: tuple[str, int, int], work: Callable[[Action, int], None], lane: int
    ) -> None:
        a, i = self.actions[key]  # the action and its index in the row
        self.watchdog.beat(self.labels[i])
        t0 = time.perf_counter()
        work(a, i)
        with self.lock:
            self._settle()  # this worker's accounting: no message to post first
            self.spans.append((t0, time.perf_counter(), a))
            self._lanes.append(lane)  # the trace's thread for the span

    def _weights(self, a: Action, i: int) -> None:
        """W of one micro-batch and chunk, layer by layer, each at its turn (a wait for a turn
        goes to `waits`, as the trace shows them)."""
        wctxs = self.wctx.pop((a.mb, a.chunk))
        layers = self.stage.chunks[a.chunk].layers
        for j in reversed(range(len(layers))):
            g, n = self.ticket[(a.mb, a.chunk, j)]
            adds = None
            if self.hold[a.chunk][j]:  # the products now; only the additions take the turn
                with accumulate.held() as adds:
                    layers[j].backward_weight(wctxs[j])
            t0 = time.perf_counter()
            self.gates[g].enter(n)
            t1 = time.perf_counter()
            if t1 - t0 > 1e-5:
                with self.lock:
                    self.waits.append((t0, t1, f"wait W turn of layer {j} for {a.mb}"))
            try:
                if adds is None:
                    layers[j].backward_weight(wctxs[j])
                else:
                    accumulate.apply(adds)
            finally:
                self.gates[g].leave()
        self.unsettled = ((a.mb, a.chunk), None, False)  # as the executor's W: nothing held

    def close(self) -> None:
        self.pool.shutdown()
