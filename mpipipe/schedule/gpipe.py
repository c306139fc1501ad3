"""GPipe: every forward, then every backward (B then W per micro-batch, in increasing order)."""

from __future__ import annotations

from mpipipe.schedule.actions import B, F, Plan, W, linear_stages


def gpipe(pp: int, m: int) -> Plan:
    row = [F(i) for i in range(m)]
    for i in range(m):
        row += [B(i), W(i)]
    return Plan("gpipe", m, linear_stages(pp), tuple(tuple(row) for _ in range(pp)))


def forward_only(pp: int, m: int) -> Plan:
    """Evaluation: forwards only, no stash kept."""
    row = tuple(F(i) for i in range(m))
    return Plan("forward", m, linear_stages(pp), tuple(row for _ in range(pp)))
