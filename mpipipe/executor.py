"""The executor: runs exactly the lowered action list of one rank, nothing else.

    for i, action in enumerate(row): dispatch[action.kind](action, i)

It holds no schedule logic. Data moves through one mailbox keyed by (kind, micro-batch, receiving
stage): a producer puts its output there; a send takes it out and ships it; a receive puts a
pending request there; a consumer takes the value, waiting only if the message is still in
flight. Stages that share a rank (several chunks) thus hand over locally with no special case.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mpipipe.model import Model
from mpipipe.parallel.p2p import Link, Reposted, tag
from mpipipe.schedule import Action, Plan, message, recv_buffer_peaks, recv_buffer_slots
from mpipipe.schedule.actions import COMPUTE
from mpipipe.schedule.deps import input_stage, output_stage
from mpipipe.stage import SavedInput, Stage
from mpipipe.watchdog import NoWatchdog
from mpipipe.xp import Array, to_host


@dataclass
class MicroBatches:
    """A step's data as the first and last stages need it, already split into micro-batches."""

    inputs: Sequence[Array] | None  # per micro-batch, for the first stage
    targets: Sequence[Array] | None  # per micro-batch, for the last stage


class Executor:
    """Runs one lowered plan row on one stage. Buffers are allocated once, at construction."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        stage: Stage,
        model: Model,
        p2p: Link,
        micro_batch: int,
        dtype: Any,
        xp: ModuleType,
        loss_scale: float | None = None,
        on_layer_final: Callable[[int], None] | None = None,
    ) -> None:
        """`loss_scale` multiplies each micro-batch's loss gradient (default 1 / micro-batches);
        `on_layer_final(i)` is called once global layer i's weight gradients are final for the
        step (to start its gradient bucket's all-reduce)."""
        self.plan, self.rank, self.stage, self.p2p = plan, rank, stage, p2p
        self.name = (
            "forward-only"
            if all(a.kind == "F" for a in plan.actions[rank] if a.is_compute)
            else "pipeline"
        )
        self.loss_scale = 1.0 / plan.microbatches if loss_scale is None else loss_scale
        self.on_layer_final = on_layer_final
        self.watchdog: Any = NoWatchdog()
        self.waits: list[tuple[float, float, str]] = []  # last run's blocking waits
        self.final_w = {a.chunk: i for i, a in enumerate(plan.actions[rank]) if a.kind == "W"}
        self.row = plan.actions[rank]
        # what each action needs that the plan alone decides, worked out once rather than per
        # action and step: the watchdog's label, and each message's mailbox key, peer and tag
        self.labels = [f"{self.name} action {a}" for a in self.row]
        self.wire: dict[int, tuple[tuple[str, int, int], int, int]] = {}
        for i, a in enumerate(self.row):
            if not a.is_compute:
                key, peer = message(plan, rank, a)
                t = tag(key[0], key[1], key[2], plan.n_stages, plan.microbatches)
                self.wire[i] = (key, peer, t)
        # each compute action's mailbox keys: where its input comes from (None: the pipeline's
        # input) and where its output goes (None: the pipeline's output)
        self.io: dict[int, tuple[tuple[str, int, int] | None, tuple[str, int, int] | None]] = {}
        n = plan.n_stages
        for i, a in enumerate(self.row):
            if a.kind in ("F", "B"):
                k = stage.ids[a.chunk]
                src, dst = input_stage(a.kind, k, n), output_stage(a.kind, k, n)
                take = None if src is None else ("A" if a.kind == "F" else "G", a.mb, k)
                put: tuple[str, int, int] | None
                if a.kind == "F":
                    put = ("A", a.mb, dst) if dst is not None else ("G", a.mb, k)
                else:
                    put = None if dst is None else ("G", a.mb, dst)
                self.io[i] = (take, put)
        self.training = any(a.kind == "B" for a in self.row)
        # every step receives into the same buffers (`recv_buffer_slots`), so each receive is
        # one persistent request, started once per step
        pools: dict[tuple[str, int], list[Array]] = {}
        for (kind, c), n in recv_buffer_peaks(self.row).items():
            layers = stage.chunks[c].indices
            boundary = layers.start - 1 if kind == "RA" else layers.stop - 1
            shape = model.act_shape(boundary, micro_batch)
            pools[(kind, c)] = [xp.empty(shape, dtype=dtype) for _ in range(n)]
        self.pending: dict[int, _Pending] = {}
        for i, slot in recv_buffer_slots(self.row).items():
            a, (key, source, t) = self.row[i], self.wire[i]
            buf = pools[(a.kind, a.chunk)][slot]
            what = "activation" if key[0] == "A" else "gradient"
            self.pending[i] = _Pending(
                buf,
                p2p.recv_init(buf, source, t),
                f"waiting for the {what} of micro-batch {key[1]} from rank {source} "
                f"(tag {t}, {buf.nbytes} bytes)",
                f"wait {what} {key[1]} from {source}",
            )
        self.spans: list[tuple[float, float, Action]] = []  # last run's compute, perf_counter
        self.waited = 0.0  # seconds the current action spent waiting for its input
        self.peak_stash = 0  # most micro-batch contexts held at once, over all runs
        self.stash_bytes: dict[tuple[int, int], int] = {}
        self.stash_total = 0  # the sum of stash_bytes
        self.peak_stash_bytes = 0  # most bytes held by saved contexts at once, over all runs
        self.peak_ctx_bytes = 0  # most bytes one forward saved for one micro-batch and chunk
        self.dispatch: dict[str, Callable[[Action, int], None]] = {
            "F": self._forward,
            "B": self._backward_input,
            "W": self._backward_weight,
            "SA": self._send,
            "SG": self._send,
            "RA": self._recv,
            "RG": self._recv,
        }
        self.handlers = [self.dispatch[a.kind] for a in self.row]

    def run(self, batch: MicroBatches) -> list[float]:
        """Run the row once; return the last stage's per-micro-batch losses (else []), brought
        to the host in one transfer."""
        self.batch = batch
        self.mail: dict[tuple[str, int, int], Any] = {}
        self.ctx: dict[tuple[int, int], Any] = {}
        self.wctx: dict[tuple[int, int], Any] = {}
        self.losses: dict[int, Array] = {}  # 0-d device arrays until the end of the run
        self.outputs: dict[int, Array] = {}  # last stage, when the batch has no targets
        self.sends: list[tuple[Any, Array]] = []
        self.spans, self.waits = [], []
        self.unsettled: tuple[tuple[int, int], Any, bool] | None = None
        # the loop runs once per action: names bound here, not looked up each time
        clock, beat, labels, progress = (
            time.perf_counter,
            self.watchdog.beat,
            self.labels,
            self.p2p.progress,
        )
        spans, handlers = self.spans, self.handlers
        self.started = clock()
        for i, action in enumerate(self.row):
            beat(labels[i])
            if action.kind in COMPUTE:
                self._settle()
                self.waited = 0.0
                t0 = clock()
                handlers[i](action, i)
                # an action first waits for its input (in _take), then computes
                spans.append((t0 + self.waited, clock(), action))
            else:
                handlers[i](action, i)
            progress()  # staged and deferred messages move on between actions
        self._settle()
        self.watchdog.beat(f"{self.name}: completing sends")
        self.watchdog.waiting("waiting for sends to complete (a neighbour not receiving?)")
        t0 = clock()
        self.p2p.waitall([req for req, _ in self.sends])
        self.finished = clock()
        self.waits.append((t0, self.finished, "wait sends"))
        self.sends.clear()
        if self.mail or self.ctx or self.wctx:  # a checked plan never gets here
            raise RuntimeError(
                f"rank {self.rank}: the plan left work undone: "
                f"{sorted(self.mail)} {sorted(self.ctx)} {sorted(self.wctx)}"
            )
        return to_host([self.losses[mb] for mb in sorted(self.losses)])

    @property
    def busy(self) -> float:
        """Seconds of compute in the last run."""
        return sum(e - b for b, e, _ in self.spans)

    @property
    def wall(self) -> float:
        """Seconds from the start of the last run to its last send completing."""
        return self.finished - self.started

    @property
    def lanes(self) -> list[int]:
        """The thread (trace track) of each of the last run's spans: one here."""
        return [0] * len(self.spans)

    def close(self) -> None:
        """Release what the executor holds beyond its buffers (nothing here)."""

    # -- compute -------------------------------------------------------------------------------
    def _forward(self, a: Action, i: int) -> None:
        take, put = self.io[i]
        inputs = self.batch.inputs
        if take is None and inputs is not None:  # the pipeline's input
            x = inputs[a.mb]
        else:
            x = self._take(take or ("A", a.mb, self.stage.ids[a.chunk]))
        y, ctx = self.stage.chunks[a.chunk].forward(x)
        assert put is not None  # a forward's output always goes somewhere: on, or to the loss
        if put[0] == "A":
            self.mail[put] = y
        elif self.batch.targets is None:  # the last stage, inference: keep the model's output
            self.outputs[a.mb] = y
            return
        elif self.training:  # the last stage: the loss and its gradient
            self.losses[a.mb], self.mail[put] = self.stage.loss.forward_backward(
                y, self.batch.targets[a.mb], self.loss_scale
            )
        else:
            self.losses[a.mb] = self.stage.loss.forward(y, self.batch.targets[a.mb])
        if self.training:
            self.ctx[(a.mb, a.chunk)] = ctx
            self.unsettled = ((a.mb, a.chunk), ctx, True)

    def _backward_input(self, a: Action, i: int) -> None:
        take, put = self.io[i]
        dy = self._take(take or ("G", a.mb, self.stage.ids[a.chunk]))
        dx, wctx = self.stage.chunks[a.chunk].backward_input(dy, self.ctx.pop((a.mb, a.chunk)))
        if put is not None:
            self.mail[put] = dx
        self.wctx[(a.mb, a.chunk)] = wctx
        self.unsettled = ((a.mb, a.chunk), wctx, False)

    def _backward_weight(self, a: Action, i: int) -> None:
        done = self.on_layer_final if i == self.final_w.get(a.chunk) else None
        self.stage.chunks[a.chunk].backward_weight(self.wctx.pop((a.mb, a.chunk)), done)
        self.unsettled = ((a.mb, a.chunk), None, False)

    def _settle(self) -> None:
        """The memory accounting of the last compute action, done after the messages that
        follow it in the row are posted (at the next compute action or the run's end), so its
        output leaves sooner; the counts and peaks are the same, as no compute runs between."""
        if self.unsettled is None:
            return
        key, saved, forward = self.unsettled
        self.unsettled = None
        self._account(key, saved)
        if forward:
            self.peak_stash = max(self.peak_stash, len(self.ctx) + len(self.wctx))
            self.peak_ctx_bytes = max(self.peak_ctx_bytes, self.stash_bytes[key])

    def _account(self, key: tuple[int, int], saved: Any) -> None:
        """Track the bytes that saved contexts hold (activation memory) and their peak."""
        new = _nbytes(saved)
        self.stash_total += new - self.stash_bytes.get(key, 0)
        self.stash_bytes[key] = new
        self.peak_stash_bytes = max(self.peak_stash_bytes, self.stash_total)

    # -- communication -------------------------------------------------------------------------
    def _send(self, a: Action, i: int) -> None:
        key, dest, t = self.wire[i]
        buf = self.mail.pop(key)
        if not buf.flags.c_contiguous:
            buf = buf.copy()
        self.sends.append((self.p2p.isend(buf, dest, t), buf))

    def _recv(self, a: Action, i: int) -> None:
        pending = self.pending[i]
        pending.receive.start()
        self.mail[self.wire[i][0]] = pending

    def _take(self, key: tuple[str, int, int]) -> Array:
        item = self.mail.pop(key)
        if isinstance(item, _Pending):
            self.watchdog.waiting(item.waiting)
            t0 = time.perf_counter()
            self.p2p.wait(item.receive.request)
            t1 = time.perf_counter()
            self.waited += t1 - t0
            self.waits.append((t0, t1, item.span))
            return item.buffer
        return item


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct arrays reachable from a saved context."""
    if obj is None:  # emulated compute, and W's (nothing held)
        return 0
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        base = getattr(obj, "base", None)
        if base is not None and hasattr(base, "nbytes"):  # a view: count its buffer once
            return _nbytes(base, seen)
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, seen) for o in obj.values())
    if isinstance(obj, SavedInput):
        return _nbytes(obj.x, seen)
    return 0


@dataclass
class _Pending:
    buffer: Array
    receive: Reposted
    waiting: str  # what the watchdog says if the wait hangs
    span: str  # the wait's name in the trace
