"""Insert communication into a checked plan: the one place that decides when messages move.

For each compute action that consumes a remote input, its receive (RA/RG) is posted one F/B
action ahead of need, so the message can land while the rank computes; each produced output is
sent (SA/SG) right after the action that made it. Neighbouring stages on the same rank (possible
with several chunks) hand over locally and get no messages.
"""

from __future__ import annotations

from mpipipe.schedule.actions import Action, Plan


def peer(plan: Plan, rank: int, chunk: int, direction: int) -> int | None:
    """Rank running the stage `direction` (+1 next, -1 previous) from (rank, chunk); None at the
    ends of the pipeline."""
    stage = plan.stages[rank][chunk] + direction
    if not 0 <= stage < plan.n_stages:
        return None
    return plan.owner(stage)[0]


def _remote(plan: Plan, rank: int, chunk: int, direction: int) -> bool:
    p = peer(plan, rank, chunk, direction)
    return p is not None and p != rank


def lower(plan: Plan) -> Plan:
    """A plan whose rows also hold SA/RA/SG/RG actions, in the order the runtime will run them."""
    rows = []
    for r, acts in enumerate(plan.actions):
        heavy = [i for i, a in enumerate(acts) if a.kind in ("F", "B")]
        post_at: dict[int, list[Action]] = {}
        for j, i in enumerate(heavy):
            a = acts[i]
            if a.kind == "F" and _remote(plan, r, a.chunk, -1):
                recv = Action("RA", a.mb, a.chunk)
            elif a.kind == "B" and _remote(plan, r, a.chunk, +1):
                recv = Action("RG", a.mb, a.chunk)
            else:
                continue
            post_at.setdefault(heavy[j - 1] if j else 0, []).append(recv)
        row: list[Action] = []
        for i, a in enumerate(acts):
            row += post_at.get(i, [])
            row.append(a)
            if a.kind == "F" and _remote(plan, r, a.chunk, +1):
                row.append(Action("SA", a.mb, a.chunk))
            elif a.kind == "B" and _remote(plan, r, a.chunk, -1):
                row.append(Action("SG", a.mb, a.chunk))
        rows.append(row)
    return plan.with_actions(rows)


def buffer_releases(row: tuple[Action, ...] | list[Action]) -> dict[int, list[int]]:
    """When each receive buffer on a lowered row is given back: {compute index: [receive index]}.

    A buffer is taken at its receive (RA/RG) and given back after the last compute action of the
    same (micro-batch, chunk) on this row, since saved contexts may reference it until then. The
    runtime follows exactly this rule; `recv_buffer_peaks` sizes its pools from it.
    """
    last = {(a.mb, a.chunk): i for i, a in enumerate(row) if a.is_compute}
    releases: dict[int, list[int]] = {}
    for i, a in enumerate(row):
        if a.kind in ("RA", "RG"):
            releases.setdefault(last[(a.mb, a.chunk)], []).append(i)
    return releases


def recv_buffer_peaks(row: tuple[Action, ...] | list[Action]) -> dict[tuple[str, int], int]:
    """Most receive buffers alive at once on one lowered row, per (kind 'RA'|'RG', chunk)."""
    freed = {i: j for j, recvs in buffer_releases(row).items() for i in recvs}
    live: dict[tuple[str, int], int] = {}
    peak: dict[tuple[str, int], int] = {}
    ends: dict[int, list[tuple[str, int]]] = {}
    for i, a in enumerate(row):
        if a.kind in ("RA", "RG"):
            key = (a.kind, a.chunk)
            live[key] = live.get(key, 0) + 1
            peak[key] = max(peak.get(key, 0), live[key])
            ends.setdefault(freed[i], []).append(key)
        for key in ends.pop(i, []):
            live[key] -= 1
    return peak
