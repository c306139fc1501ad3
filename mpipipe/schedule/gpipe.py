"""GPipe: every forward, then every backward (B then W per micro-batch, in increasing order)."""

from __future__ import annotations

from mpipipe.schedule.actions import B, F, Plan, W, linear_stages


def gpipe(pp: int, m: int) -> Plan:
    row = [F(i) for i in range(m)]
    for i in range(m):
        row += [B(i), W(i)]
    return Plan("gpipe", m, linear_stages(pp), tuple(tuple(row) for _ in range(pp)))


def forward_only(plan: Plan) -> Plan:
    """Evaluation with `plan`'s layout: forwards only, each rank taking its stages in increasing
    order (a topological order of the forward chain, so it cannot deadlock)."""
    m = plan.microbatches
    rows = []
    for chunks in plan.stages:
        order = sorted(range(len(chunks)), key=lambda c: chunks[c])
        rows.append(tuple(F(i, c) for c in order for i in range(m)))
    return Plan("forward", m, plan.stages, tuple(rows))
