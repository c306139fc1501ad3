"""1F1B (PipeDream-flush): stage s runs min(pp - s - 1, m) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. Peak stash: min(pp - s, m)."""

from __future__ import annotations

from mpipipe.schedule.actions import Action, B, F, Plan, W, linear_stages


def one_f_one_b(pp: int, m: int) -> Plan:
    return Plan("1f1b", m, linear_stages(pp), tuple(_rank(pp, m, s) for s in range(pp)))


def _rank(pp: int, m: int, s: int) -> tuple[Action, ...]:
    warmup = min(pp - s - 1, m)
    row = [F(i) for i in range(warmup)]
    for i in range(m - warmup):
        row += [F(warmup + i), B(i), W(i)]
    for i in range(m - warmup, m):
        row += [B(i), W(i)]
    return tuple(row)
