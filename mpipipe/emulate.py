"""Emulated compute: each action sleeps for a given time instead of doing the math, while real
activation and gradient buffers of the configured shapes still cross MPI.

Sleeping ranks need no cores, so this measures what a schedule and the executor achieve on 8, 16
or 32 ranks of a 2-core machine. Costs are milliseconds per body layer (a transformer block) per
sample: a chunk of L layers running a micro-batch of b samples sleeps L * b times the cost, so
the work scales with the model and the batch as real compute does: strong scaling (more stages,
smaller replicas' shares) and every schedule do the same total work. The embedding and the head
are free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mpipipe.errors import ConfigError
from mpipipe.model import Model
from mpipipe.schedule import Costs
from mpipipe.stage import Compute
from mpipipe.xp import Array


@dataclass(frozen=True)
class Emulation:
    """Milliseconds per F, B and W of one body layer for one sample."""

    f_ms: float
    b_ms: float
    w_ms: float

    @classmethod
    def parse(cls, text: str) -> Emulation:
        try:
            costs = Costs.parse(text)
        except ValueError as e:
            raise ConfigError(f"--emulate: {e}") from None
        if costs.latency:
            raise ConfigError(
                "--emulate takes F=, B=, W= in milliseconds (no latency: it is real)"
            )
        return cls(costs.of("F"), costs.of("B"), costs.of("W"))

    def costs(self, body_per_stage: list[int], micro_batch: int) -> Costs:
        """Simulator costs per virtual stage, in seconds."""
        scale = [n * micro_batch / 1e3 for n in body_per_stage]
        return Costs(
            [self.f_ms * x for x in scale],
            [self.b_ms * x for x in scale],
            [self.w_ms * x for x in scale],
        )


def body_per_stage(model: Model, bounds: list[range]) -> list[int]:
    """Body layers in each virtual stage (the emulated work)."""
    return [sum(model.layers[i].body for i in r) for r in bounds]


class EmulatedChunk:
    """Sleeps instead of computing; holds the real layers only for their parameters."""

    def __init__(self, layers: list[Any], indices: range, out: Array, dx: Array | None,
                 costs: Costs, k: int) -> None:  # fmt: skip
        self.indices, self.layers = indices, layers
        self.out, self.dx = out, dx
        self.f, self.b, self.w = costs.of("F", k), costs.of("B", k), costs.of("W", k)

    def forward(self, x: Array) -> tuple[Array, Any]:
        _sleep(self.f)
        return self.out, None

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]:
        _sleep(self.b)
        return self.dx, None

    def backward_weight(self, wctx: Any, done: Any = None) -> None:
        for i in reversed(self.indices):  # per layer, so gradient buckets can start early
            _sleep(self.w / len(self.indices))
            if done is not None:
                done(i)


class _Sleeper:
    """time.sleep whose sleeps add up to what was asked: a sleep wakes late by the kernel's timer
    slack and the wake-up (60-300 us here, more when ranks share cores), which would otherwise
    add to every emulated action and be measured as the runtime's overhead. The time overslept
    so far is owed, and each sleep asks for that much less (at most half of it: one late wake is
    repaid over the next actions, not by one that hardly sleeps), so over a run the emulated
    compute lasts its cost to within one sleep's error. Nothing for zero: even sleep(0) is a
    system call that costs tens of microseconds on some machines."""

    def __init__(self) -> None:
        self.owed = 0.0  # seconds slept beyond what was asked, not yet repaid

    def __call__(self, seconds: float) -> None:
        if seconds <= 0:
            return
        t0 = time.perf_counter()
        time.sleep(max(seconds - self.owed, seconds / 2))
        self.owed = max(self.owed + time.perf_counter() - t0 - seconds, -seconds)


_sleep = _Sleeper()


class _EmulatedLoss:
    def __init__(self, dy: Array, zero: Array) -> None:
        self.dy, self.zero = dy, zero

    def forward_backward(self, y: Array, targets: Array, scale: float) -> tuple[Array, Array]:
        return self.zero, self.dy

    def forward(self, y: Array, targets: Array) -> Array:
        return self.zero


@dataclass(frozen=True)
class EmulatedCompute:
    """Chunks that sleep their virtual stage's `costs` (seconds) instead of computing, with the
    real parameters and gradient buffers (so gradient reductions and the optimizer move real
    bytes) and outputs of the real shapes: the `Compute` of stage.py, emulated."""

    real: Compute
    costs: Costs
    micro_batch: int

    def chunk(self, model: Model, indices: range, k: int) -> EmulatedChunk:
        xp, dtype, b = self.real.xp, self.real.dtype, self.micro_batch
        out = xp.zeros(model.act_shape(indices.stop - 1, b), dtype=dtype)
        dx = xp.zeros(model.act_shape(indices.start - 1, b), dtype=dtype) if k else None
        return EmulatedChunk(self.real.layers(model, indices), indices, out, dx, self.costs, k)

    def loss(self, model: Model) -> _EmulatedLoss:
        xp, dtype, last = self.real.xp, self.real.dtype, len(model.layers) - 1
        dy = xp.zeros(model.act_shape(last, self.micro_batch), dtype=dtype)
        return _EmulatedLoss(dy, xp.zeros((), dtype="float32"))
