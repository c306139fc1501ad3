"""Gradient reduction across data-parallel replicas, overlapped with the backward pass.

A stage's gradients are re-homed into a few flat buckets (each gradient becomes a view into its
bucket, so there is no copy in or out). Buckets hold whole layers in backward order (last layer
first), up to `bucket_bytes` each. When the last weight-gradient work of the step has finished a
bucket's layers, its in-place `Iallreduce` starts at once and overlaps the remaining backward
work; `finish()` waits for all before the optimizer step.

Buckets travel through the rank's one transport (parallel/transport.py), like the pipeline's
messages: on a GPU, directly to a CUDA-aware MPI once the gradient kernels have finished, else
staged through pinned host memory. 16-bit gradients are summed in a float32 copy of the bucket
(MPI before 4.1 has no 16-bit float type, and float32 sums lose less).

MPI libraries progress a non-blocking collective only inside MPI calls, and the compute between
them makes none. So while reductions are open, a helper thread advances them with a short
back-off sleep (MPI_THREAD_MULTIPLE, which mpi4py asks for by default); NumPy and sleeps release
the GIL, so it runs alongside the backward work. Where the MPI library lacks thread support, the
executor's progress call between actions is the fallback.

With ZeRO-1 (`shards` = the number of replicas) each bucket is padded with zeros to a multiple
of the replicas and reduce-scattered instead: replica r receives block r of the sum (`shards[b]`,
float32 for 16-bit gradients), which is all its optimizer shard needs (parallel/zero.py).

The loss is already scaled by 1 / (micro-batches x replicas), so the SUM over replicas is the
gradient of the mean loss over the global batch, as in the single-process run.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from mpi4py import MPI

from mpipipe.parallel.transport import Transport
from mpipipe.xp import Array, is_half, namespace_of


class GradReducer:
    def __init__(
        self,
        stage: Any,
        comm: MPI.Comm,
        transport: Transport,
        bucket_bytes: int,
        overlap: bool = True,
        shards: int = 1,
    ) -> None:
        self.comm, self.transport, self.overlap = comm, transport, overlap
        self.active = threading.Event()  # set while this step's reductions are open
        self.closed = False
        self.buckets: list[Array] = []
        self.sums: list[Array] = []  # what is reduced: the bucket, or its float32 copy
        self.members: list[set[int]] = []  # global layer indices per bucket
        self.names: list[list[str]] = []  # parameter names per bucket, in bucket order
        self.shards: list[Array] = []  # ZeRO-1: my block of each bucket's sum
        layers = sorted(stage.layer_params, reverse=True)  # backward order
        groups: list[list[int]] = [[]]
        size = 0
        for i in layers:
            nbytes = sum(stage.grads[n].nbytes for n in stage.layer_params[i])
            if groups[-1] and size + nbytes > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        remap: dict[int, Array] = {}
        for group in groups:
            names = [n for i in group for n in stage.layer_params[i]]
            if not names:
                continue
            first = stage.grads[names[0]]
            xp = namespace_of(first)
            used = sum(stage.grads[n].size for n in names)
            padded = -(-used // shards) * shards  # zero padding for equal blocks (stays zero)
            flat = xp.zeros(padded, dtype=first.dtype)
            offset = 0
            for n in names:
                g = stage.grads[n]
                view = flat[offset : offset + g.size].reshape(g.shape)
                view[...] = g
                remap[id(g)] = view
                offset += g.size
            self.buckets.append(flat)
            self.members.append(set(group))
            self.names.append(names)
            wide = is_half(flat.dtype)  # fp16 and bf16 (whose NumPy kind is "V", not "f")
            self.sums.append(xp.zeros(flat.size, dtype="float32") if wide else flat)
            if shards > 1:
                self.shards.append(xp.zeros(padded // shards, dtype=self.sums[-1].dtype))
        stage.rebind_grads(remap)
        self.reset()
        self.thread: threading.Thread | None = None
        if overlap and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self.thread = threading.Thread(target=self._progress, daemon=True)
            self.thread.start()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def reset(self) -> None:
        self.pending = [set(m) for m in self.members]
        self.requests: list[Any] = [None] * len(self.buckets)

    def layer_ready(self, index: int) -> None:
        """Layer `index`'s gradients are final for this step."""
        for b, pending in enumerate(self.pending):
            if index in pending:
                pending.discard(index)
                if not pending and self.overlap:
                    self._start(b)
                return

    def _start(self, b: int) -> None:
        if self.requests[b] is None:
            if self.sums[b] is not self.buckets[b]:
                self.sums[b][...] = self.buckets[b]  # 16-bit -> float32, on the compute stream
            if self.shards:
                send, recv = self.sums[b], self.shards[b]
                self.requests[b] = self.transport.ireduce_scatter(self.comm, send, recv)
            else:
                self.requests[b] = self.transport.iallreduce(self.comm, self.sums[b])
            self.active.set()

    def _progress(self) -> None:
        """The helper thread: while reductions are open, advance them with a short back-off."""
        while True:
            self.active.wait()
            if self.closed:
                return
            sleep = 2e-5
            while self.active.is_set():
                self.transport.progress()
                time.sleep(sleep)
                sleep = min(2 * sleep, 2e-4)

    def finish(self) -> None:
        """Start what has not started (all of it, without overlap), then wait for everything."""
        for b in range(len(self.buckets)):
            self._start(b)
        self.transport.waitall(self.requests)
        self.active.clear()
        for bucket, total in zip(self.buckets, self.sums, strict=True):
            if total is not bucket and not self.shards:
                bucket[...] = total  # float32 -> 16-bit
        self.reset()

    def close(self) -> None:
        """Stop the helper thread."""
        self.closed = True
        self.active.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
