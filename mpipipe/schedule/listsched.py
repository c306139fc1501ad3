"""A cost-aware list scheduler under a cap on stashed activations, for one chunk per rank or a V.

It plays the ranks forward in time: whenever one is free, it starts the action that can start
earliest (ties: B, then F, then W), so deferred W passes fill the gaps, as in zero-bubble
scheduling. `w_delay` makes a W yield to an F or B that can start within that many W costs.
Per chunk, F, B and W go in increasing micro-batch order (bitwise-equal gradients).

Memory: an F stashes one chunk-activation until its W. A new micro-batch is admitted on a rank
only when every chunk-activation it will need there (all of its chunks: two on a V) still fits
under `limit` next to those already stashed or promised, so an admitted micro-batch never waits
for memory and the schedule cannot deadlock for any `limit` >= chunks per rank (the last rank
admits whenever it holds nothing; what it admits, every rank has admitted).
"""

from __future__ import annotations

from mpipipe.errors import ConfigError
from mpipipe.schedule.actions import Action, Plan
from mpipipe.schedule.check import Costs
from mpipipe.schedule.deps import needs

ORDERS = {"BFW": {"B": 0, "F": 1, "W": 2}, "FBW": {"F": 0, "B": 1, "W": 2}}


def v_stages(pp: int) -> tuple[tuple[int, ...], ...]:
    """The V: rank r runs stage r (chunk 0) and stage 2 pp - 1 - r (chunk 1), as ZB-V does."""
    return tuple((r, 2 * pp - 1 - r) for r in range(pp))


def list_schedule(
    name: str,
    m: int,
    stages: tuple[tuple[int, ...], ...],
    limit: int,
    costs: Costs | None = None,
    order: str = "BFW",
    w_delay: float = 0.0,
) -> Plan:
    """Schedule F/B/W for `stages` (rank -> chunk -> virtual stage), at most `limit`
    chunk-activations stashed per rank, timed with `costs` (per virtual stage; unit by default)."""
    costs = costs or Costs()
    pp, n = len(stages), sum(len(s) for s in stages)
    v = len(stages[0])
    if limit < v:
        raise ConfigError(
            f"a memory cap of {limit} chunk-activation(s) per rank cannot hold one micro-batch "
            f"on {v} chunk(s) per rank (allow at least {v})"
        )
    prio = ORDERS[order]
    # chunk order a micro-batch visits on each rank: the first one admits it
    first = [row.index(min(row)) for row in stages]
    finish: dict[tuple[str, int, int], tuple[float, int]] = {}
    nxt = [{(k, c): 0 for k in "FBW" for c in range(v)} for _ in range(pp)]
    clock = [0.0] * pp
    live = [0] * pp  # chunk-activations stashed (F done, W not yet)
    promised = [0] * pp  # F passes still due for micro-batches admitted on this rank
    rows: list[list[Action]] = [[] for _ in range(pp)]
    owner = {k: r for r, chunks in enumerate(stages) for k in chunks}
    cand: list[tuple[tuple[float, int, int, int, int], float, str, int, int] | None] = [None] * pp

    def best_of(r: int) -> tuple[tuple[float, int, int, int, int], float, str, int, int] | None:
        best = None
        for (kind, c), mb in nxt[r].items():
            if mb >= m:
                continue
            if kind == "F" and c == first[r] and live[r] + promised[r] + v > limit:
                continue
            k = stages[r][c]
            start = clock[r]
            for d in needs(kind, mb, k, n):
                if d not in finish:
                    break
                t, src = finish[d]
                start = max(start, t + (costs.latency if src != r else 0.0))
            else:
                rank_key = start + (w_delay * costs.of("W", k) if kind == "W" else 0.0)
                key = (rank_key, prio[kind], r, c, mb)
                if best is None or key < best[0]:
                    best = (key, start, kind, mb, c)
        return best

    stale = set(range(pp))
    for _ in range(3 * m * n):
        for r in stale:
            cand[r] = best_of(r)
        found = [x for x in cand if x is not None]
        if not found:  # unreachable for limit >= v (see the module docstring)
            raise RuntimeError(f"{name}: the list scheduler got stuck")
        _, start, kind, mb, c = min(found)
        r = min(found)[0][2]
        k = stages[r][c]
        clock[r] = start + costs.of(kind, k)
        finish[(kind, mb, k)] = (clock[r], r)
        if kind == "F":
            if c == first[r]:
                promised[r] += v
            promised[r] -= 1
            live[r] += 1
        elif kind == "W":
            live[r] -= 1
        nxt[r][(kind, c)] += 1
        rows[r].append(Action(kind, mb, c))
        stale = {r} | {owner[j] for j in (k - 1, k + 1) if 0 <= j < n}
    return Plan(name, m, stages, tuple(tuple(row) for row in rows))
