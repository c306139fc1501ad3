"""Interleaved 1F1B (Megatron-LM's virtual pipeline stages).

Rank r runs `v` chunks; chunk c is virtual stage c * pp + r, so a micro-batch visits every rank v
times. Micro-batches go in groups of pp: forward i (0 <= i < m * v) is micro-batch
(i // (pp * v)) * pp + i % pp on chunk (i // pp) % v; backward i is the same micro-batch on chunk
v - 1 - (i // pp) % v. Warm-up: (pp - r - 1) * 2 + (v - 1) * pp forwards, then one forward and one
backward in turn, then the remaining backwards. Bubble: (pp - 1) / (v * m + pp - 1) of the
1F1B one, for the price of v times as many messages. Needs m to be a multiple of pp.
"""

from __future__ import annotations

from mpipipe.errors import ConfigError
from mpipipe.schedule.actions import Action, B, F, Plan, W


def interleaved(pp: int, m: int, v: int = 2) -> Plan:
    if v < 1:
        raise ConfigError(f"--virtual-stages {v} must be at least 1")
    if m % pp:
        raise ConfigError(
            f"interleaved 1F1B needs --microbatches to be a multiple of --pp: {m} is not a "
            f"multiple of {pp} (use e.g. --microbatches {pp * max(1, round(m / pp))})"
        )
    stages = tuple(tuple(c * pp + r for c in range(v)) for r in range(pp))
    return Plan("interleaved", m, stages, tuple(_rank(pp, m, v, r) for r in range(pp)))


def _rank(pp: int, m: int, v: int, r: int) -> tuple[Action, ...]:
    total = m * v

    def mb(i: int) -> int:
        return (i // (pp * v)) * pp + i % pp

    def fwd(i: int) -> Action:
        return F(mb(i), (i // pp) % v)

    def bwd(i: int) -> list[Action]:
        c = v - 1 - (i // pp) % v
        return [B(mb(i), c), W(mb(i), c)]

    warmup = total if m == pp else min(total, (pp - r - 1) * 2 + (v - 1) * pp)
    row = [fwd(i) for i in range(warmup)]
    for k in range(total - warmup):
        row.append(fwd(warmup + k))
        row += bwd(k)
    for k in range(total - warmup, total):
        row += bwd(k)
    return tuple(row)
