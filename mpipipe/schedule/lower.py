"""Insert communication into a checked plan: the one place that decides when messages move.

For each compute action that consumes a remote input, its receive (RA/RG) is posted one F/B
action ahead of need, so the message can land while the rank computes; each produced output is
sent (SA/SG) right after the action that made it. Neighbouring stages on the same rank (possible
with several chunks) hand over locally and get no messages.
"""

from __future__ import annotations

from mpipipe.schedule.actions import Action, Plan
from mpipipe.schedule.deps import input_stage, output_stage

RECV = {"F": "RA", "B": "RG"}  # the receive that brings a compute action its input
SEND = {"F": "SA", "B": "SG"}  # the send that ships a compute action's output
PAYLOAD = {"SA": ("F", "A"), "RA": ("F", "A"), "SG": ("B", "G"), "RG": ("B", "G")}


def _other_rank(plan: Plan, rank: int, stage: int | None) -> bool:
    return stage is not None and plan.owner(stage)[0] != rank


def message(plan: Plan, rank: int, a: Action) -> tuple[tuple[str, int, int], int]:
    """A communication action's mailbox key (payload 'A' or 'G', micro-batch, the virtual stage
    that consumes it) and the rank at the other end, from the dependency rule."""
    compute, payload = PAYLOAD[a.kind]
    k, n = plan.stages[rank][a.chunk], plan.n_stages
    if a.kind in ("RA", "RG"):
        src = input_stage(compute, k, n)
        assert src is not None, f"{a} at the end of the pipeline"
        return (payload, a.mb, k), plan.owner(src)[0]
    dst = output_stage(compute, k, n)
    assert dst is not None, f"{a} at the end of the pipeline"
    return (payload, a.mb, dst), plan.owner(dst)[0]


def lower(plan: Plan) -> Plan:
    """A plan whose rows also hold SA/RA/SG/RG actions, in the order the runtime will run them."""
    rows = []
    for r, acts in enumerate(plan.actions):
        heavy = [i for i, a in enumerate(acts) if a.kind in ("F", "B")]
        post_at: dict[int, list[Action]] = {}
        for j, i in enumerate(heavy):
            a = acts[i]
            k = plan.stages[r][a.chunk]
            if _other_rank(plan, r, input_stage(a.kind, k, plan.n_stages)):
                recv = Action(RECV[a.kind], a.mb, a.chunk)
                post_at.setdefault(heavy[j - 1] if j else 0, []).append(recv)
        row: list[Action] = []
        for i, a in enumerate(acts):
            row += post_at.get(i, [])
            row.append(a)
            k = plan.stages[r][a.chunk]
            if _other_rank(plan, r, output_stage(a.kind, k, plan.n_stages)):
                row.append(Action(SEND[a.kind], a.mb, a.chunk))
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


def recv_buffer_slots(row: tuple[Action, ...] | list[Action]) -> dict[int, int]:
    """Which buffer of its pool (one pool per kind 'RA'|'RG' and chunk) each receive on a
    lowered row takes: `buffer_releases` played through the row once, the buffer given back
    last taken first. The executor receives into the same buffers every step, so each receive
    is one persistent request; a pool's slots are 0 .. its `recv_buffer_peaks` - 1."""
    releases = buffer_releases(row)
    free: dict[tuple[str, int], list[int]] = {}
    made: dict[tuple[str, int], int] = {}
    slots: dict[int, int] = {}
    for i, a in enumerate(row):
        if a.kind in ("RA", "RG"):
            key = (a.kind, a.chunk)
            pool = free.setdefault(key, [])
            slots[i] = pool.pop() if pool else made.get(key, 0)
            made[key] = max(made.get(key, 0), slots[i] + 1)
        for j in releases.get(i, ()):
            free[(row[j].kind, row[j].chunk)].append(slots[j])
    return slots


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
