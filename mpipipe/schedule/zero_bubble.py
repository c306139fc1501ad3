"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) built on the
B/W split: B (input gradient) is on the critical path between stages, W (weight gradient) is not,
so W can be deferred to fill the bubbles that 1F1B leaves.

F, B and W each go in increasing micro-batch order per chunk, so gradients accumulate in the same
order as in every other schedule (bitwise-equal results).

- ZB-H1 (handcrafted, the paper's section 2.1): 1F1B whose stage s starts its W passes s
  micro-batches late, so B passes run back to back down the pipeline and the deferred W passes
  fill the tail. Every stage holds at most min(pp, m) micro-batches in flight: the peak of 1F1B's
  first stage, so no rank needs more activation memory than 1F1B's worst one. With equal costs its
  idle time per rank is (pp - 1)(F + B - W), a third of 1F1B's (pp - 1)(F + B + W) when 1F1B runs
  B and W as one backward (ours sends the gradient before W already: (pp - 1)(F + B)).
- ZB-V: two chunks per rank in a V: rank r runs stage r (chunk 0) and stage 2 pp - 1 - r
  (chunk 1), so the first and last stages share rank 0 and the tip of the V hands over locally.
  Built by a small list scheduler: simulate the ranks with unit costs and, whenever a rank is
  free, start the action that can start earliest, preferring B, then F (only while fewer than
  2 min(pp, m) chunk-activations, half a stage each, are in flight: 1F1B's peak memory), then W.
"""

from __future__ import annotations

from mpipipe.schedule.actions import Action, B, F, Plan, W, linear_stages
from mpipipe.schedule.deps import needs

_PRIORITY = {"B": 0, "F": 1, "W": 2}


def zb_h1(pp: int, m: int) -> Plan:
    return Plan("zb-h1", m, linear_stages(pp), tuple(_zb_h1_rank(pp, m, s) for s in range(pp)))


def _zb_h1_rank(pp: int, m: int, s: int) -> tuple[Action, ...]:
    warmup = min(pp - 1 - s, m)
    row = [F(i) for i in range(warmup)]
    w = 0  # next micro-batch whose W is due; stage s lets its first s W passes wait

    def backward(i: int) -> None:
        nonlocal w
        row.append(B(i))
        if i >= s:
            row.append(W(w))
            w += 1

    for i in range(m - warmup):
        row.append(F(warmup + i))
        backward(i)
    for i in range(m - warmup, m):
        backward(i)
    row.extend(W(i) for i in range(w, m))
    return tuple(row)


def zbv(pp: int, m: int) -> Plan:
    stages = tuple((r, 2 * pp - 1 - r) for r in range(pp))
    return greedy("zbv", m, stages, limit=2 * min(pp, m))


def greedy(name: str, m: int, stages: tuple[tuple[int, ...], ...], limit: int) -> Plan:
    """List-schedule F/B/W for `stages` (rank -> chunk -> stage) under the checker's rules."""
    pp = len(stages)
    n = sum(len(s) for s in stages)
    finish: dict[tuple[str, int, int], float] = {}  # (kind, mb, stage) -> finish time
    nxt = [{(k, c): 0 for k in "FBW" for c in range(len(stages[r]))} for r in range(pp)]
    clock = [0.0] * pp
    live = [0] * pp
    rows: list[list[Action]] = [[] for _ in range(pp)]
    for _ in range(3 * m * n):
        best = None
        for r in range(pp):
            for (kind, c), mb in nxt[r].items():
                if mb >= m or (kind == "F" and live[r] >= limit):
                    continue
                k = stages[r][c]
                deps = needs(kind, mb, k, n)
                if any(d not in finish for d in deps):
                    continue
                start = max([clock[r]] + [finish[d] for d in deps])
                key = (start, _PRIORITY[kind], r, mb, c)
                if best is None or key < best[0]:
                    best = (key, r, kind, mb, c)
        if best is None:  # cannot happen for limit >= 1 (B and W always drain)
            raise RuntimeError(f"{name}: the list scheduler got stuck")
        (start, *_), r, kind, mb, c = best
        finish[(kind, mb, stages[r][c])] = clock[r] = start + 1.0
        live[r] += {"F": 1, "B": 0, "W": -1}[kind]
        nxt[r][(kind, c)] += 1
        rows[r].append(Action(kind, mb, c))
    return Plan(name, m, stages, tuple(tuple(row) for row in rows))
