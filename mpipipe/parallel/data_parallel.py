"""Gradient reduction across data-parallel replicas, overlapped with the backward pass.

A stage's gradients are re-homed into a few flat buckets (each gradient becomes a view into its
bucket, so there is no copy in or out). Buckets hold whole layers in backward order (last layer
first), up to `bucket_bytes` each. When the last weight-gradient work of the step has finished a
bucket's layers, its in-place `Iallreduce` starts at once and overlaps the remaining backward
work; `finish()` waits for all before the optimizer step. MPI libraries progress a non-blocking
collective only inside MPI calls, so the runtime `poke()`s the open requests between actions and
between layers of the final weight-gradient pass.

The loss is already scaled by 1 / (micro-batches x replicas), so the SUM over replicas is the
gradient of the mean loss over the global batch, as in the single-process run.
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpipipe.xp import Array, namespace_of


class GradReducer:
    def __init__(self, stage: Any, comm: MPI.Comm, bucket_bytes: int, overlap: bool = True):
        self.comm, self.overlap = comm, overlap
        self.buckets: list[Array] = []
        self.members: list[set[int]] = []  # global layer indices per bucket
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
            flat = xp.zeros(sum(stage.grads[n].size for n in names), dtype=first.dtype)
            offset = 0
            for n in names:
                g = stage.grads[n]
                view = flat[offset : offset + g.size].reshape(g.shape)
                view[...] = g
                remap[id(g)] = view
                offset += g.size
            self.buckets.append(flat)
            self.members.append(set(group))
        stage.rebind_grads(remap)
        self.reset()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def reset(self) -> None:
        self.pending = [set(m) for m in self.members]
        self.requests: list[Any] = [None] * len(self.buckets)
        self.started_at: list[float] = [0.0] * len(self.buckets)

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
            self.started_at[b] = MPI.Wtime()
            self.requests[b] = self.comm.Iallreduce(MPI.IN_PLACE, self.buckets[b], op=MPI.SUM)

    def poke(self) -> None:
        """Let MPI progress the open reductions (non-blocking)."""
        live = [r for r in self.requests if r is not None]
        if live:
            MPI.Request.Testall(live)

    def finish(self, wait: Any) -> None:
        """Start what has not started (all of it, without overlap), then wait for everything."""
        for b in range(len(self.buckets)):
            self._start(b)
        for r in self.requests:
            wait(r)
        self.reset()
