"""Validate a plan and dry-run it: structure, deadlock freedom, peak stash, and a timeline.

The dry run plays every rank's compute list against the dependency rules (sends never block, as
in the runtime, whose sends are non-blocking and whose receives are posted ahead of need):

    F(mb) on stage k   needs F(mb) on stage k - 1 (k > 0)
    B(mb) on stage k   needs F(mb) on stage k, and B(mb) on stage k + 1 (k < last)
    W(mb) on stage k   needs B(mb) on stage k

If no rank can make progress before all are done, the plan deadlocks: the error names each stuck
rank, the action it is stuck on and what that action waits for, and draws the grid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mpipipe.errors import ScheduleError
from mpipipe.schedule.actions import COMPUTE, Action, Plan
from mpipipe.schedule.deps import message_input


@dataclass(frozen=True)
class Costs:
    """Time per action and per point-to-point hop. `f`, `b`, `w` are one number for every
    virtual stage, or a sequence with one number per virtual stage."""

    f: float | Sequence[float] = 1.0
    b: float | Sequence[float] = 1.0
    w: float | Sequence[float] = 1.0
    latency: float = 0.0

    def of(self, kind: str, stage: int = 0) -> float:
        value = {"F": self.f, "B": self.b, "W": self.w}[kind]
        return float(value) if isinstance(value, (int, float)) else float(value[stage])

    @classmethod
    def parse(cls, text: str) -> Costs:
        """'F=1,B=2,W=1[,latency=0.1]' (missing keys keep their defaults)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            name = {"f": "f", "b": "b", "w": "w", "latency": "latency", "l": "latency"}.get(
                key.strip().lower()
            )
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not sep or name is None or number < 0:
                raise ValueError(
                    f"cannot read costs {text!r}: expected comma-separated F=, B=, W=, latency= "
                    "with non-negative numbers, e.g. F=1,B=2,W=1"
                )
            values[name] = number
        return cls(**values)


@dataclass
class Report:
    """What the dry run found. Spans are (start, end, action) per rank, in execution order."""

    plan: Plan
    peak_stash: list[int]
    spans: list[list[tuple[float, float, Action]]] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        return max((s[-1][1] for s in self.spans if s), default=0.0)

    @property
    def busy(self) -> list[float]:
        return [sum(e - b for b, e, _ in s) for s in self.spans]

    @property
    def idle(self) -> list[float]:
        """Per rank: step time minus busy time."""
        return [self.step_time - b for b in self.busy]

    @property
    def bubble(self) -> float:
        """Idle fraction of all ranks over the step (0 = no bubble)."""
        total = self.step_time * self.plan.pp
        return 1.0 - sum(self.busy) / total if total else 0.0


def render(plan: Plan, marks: dict[tuple[int, int], str] | None = None) -> str:
    """Rank × step grid of compute actions; marked cells are bracketed, notes listed below."""
    marks = marks or {}
    rows = []
    for r, acts in enumerate(plan.actions):
        cells = [f"[{a}]" if (r, i) in marks else f" {a} " for i, a in enumerate(acts)]
        rows.append(f"rank {r:>2} |" + "".join(f"{c:>7}" for c in cells))
    notes = [f"  rank {r} step {i}: {why}" for (r, i), why in sorted(marks.items())]
    return "\n".join(rows + notes)


def _validate_structure(plan: Plan) -> None:
    m = plan.microbatches
    if len(plan.actions) != plan.pp:
        raise ScheduleError(f"the plan has {len(plan.actions)} action rows for {plan.pp} ranks")
    stages = sorted(s for chunks in plan.stages for s in chunks)
    if stages != list(range(plan.n_stages)):
        raise ScheduleError(f"virtual stages {stages} must be 0..{plan.n_stages - 1}, each once")
    kinds_seen: set[str] = set()
    for r, acts in enumerate(plan.actions):
        for i, a in enumerate(acts):
            if a.kind not in COMPUTE:
                raise ScheduleError(
                    f"rank {r} step {i}: {a} is not a compute action (builders emit F, B, W only;"
                    " lower() adds communication)\n" + render(plan, {(r, i): "not F/B/W"})
                )
            if not (0 <= a.mb < m and 0 <= a.chunk < len(plan.stages[r])):
                raise ScheduleError(
                    f"rank {r} step {i}: {a} is out of range (micro-batches 0..{m - 1}, "
                    f"chunks 0..{len(plan.stages[r]) - 1})\n" + render(plan, {(r, i): "range"})
                )
        counts = Counter(acts)
        for a, n in counts.items():
            if n > 1:
                i = [j for j, b in enumerate(acts) if b == a][1]
                raise ScheduleError(
                    f"rank {r} runs {a} {n} times (each action exactly once)\n"
                    + render(plan, {(r, i): "repeated"})
                )
        kinds_seen |= {a.kind for a in acts}
    expected = ["F"] + (["B", "W"] if kinds_seen & {"B", "W"} else [])
    for r, acts in enumerate(plan.actions):
        pos = {a: i for i, a in enumerate(acts)}
        for c in range(len(plan.stages[r])):
            for mb in range(m):
                for k in expected:
                    if Action(k, mb, c) not in pos:
                        raise ScheduleError(
                            f"rank {r} never runs {Action(k, mb, c)} (every rank runs "
                            f"{'/'.join(expected)} once per micro-batch and chunk)\n"
                            + render(plan)
                        )
                for before, after in (("F", "B"), ("B", "W")):
                    a, b = Action(before, mb, c), Action(after, mb, c)
                    if b in pos and pos[b] < pos[a]:
                        raise ScheduleError(
                            f"rank {r} step {pos[b]}: {b} runs before {a} ({after} needs {before}"
                            " of the same micro-batch first)\n"
                            + render(plan, {(r, pos[b]): f"needs {a} first"})
                        )


def _needs(plan: Plan, rank: int, a: Action) -> tuple[str, int, int] | None:
    """The remote-or-local event (kind, mb, stage) that action `a` on `rank` waits for; the
    local order (F before B before W) is checked structurally."""
    return message_input(a.kind, a.mb, plan.stages[rank][a.chunk], plan.n_stages)


def check(plan: Plan, costs: Costs | None = None) -> Report:
    """Validate `plan` and simulate it; raise ScheduleError on any flaw, else return a Report."""
    _validate_structure(plan)
    return simulate(plan, costs)


def simulate(plan: Plan, costs: Costs | None = None) -> Report:
    """The dry run alone, for a plan `check` has accepted already (the per-step prediction)."""
    costs = costs or Costs()
    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # event -> (finish, rank)
    cursor = [0] * plan.pp
    clock = [0.0] * plan.pp
    live = [0] * plan.pp
    peak = [0] * plan.pp
    spans: list[list[tuple[float, float, Action]]] = [[] for _ in range(plan.pp)]
    has_w = any(a.kind == "W" for row in plan.actions for a in row)
    remaining = sum(len(r) for r in plan.actions)
    while remaining:
        progressed = False
        for r, acts in enumerate(plan.actions):
            while cursor[r] < len(acts):
                a = acts[cursor[r]]
                need = _needs(plan, r, a)
                start = clock[r]
                if need is not None:
                    if need not in done:
                        break
                    finish, src = done[need]
                    start = max(start, finish + (costs.latency if src != r else 0.0))
                end = start + costs.of(a.kind, plan.stages[r][a.chunk])
                spans[r].append((start, end, a))
                clock[r] = end
                done[(a.kind, a.mb, plan.stages[r][a.chunk])] = (end, r)
                if a.kind == "F" and has_w:
                    live[r] += 1
                    peak[r] = max(peak[r], live[r])
                elif a.kind == "W":
                    live[r] -= 1
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleError(_deadlock_message(plan, cursor))
    return Report(plan, peak, spans)


def _deadlock_message(plan: Plan, cursor: list[int]) -> str:
    marks, lines, waits_on = {}, [], {}
    for r, acts in enumerate(plan.actions):
        if cursor[r] >= len(acts):
            continue
        a = acts[cursor[r]]
        kind, mb, stage = _needs(plan, r, a) or ("?", a.mb, -1)
        peer, chunk = plan.owner(stage)
        want = Action(kind, mb, chunk)
        waits_on[r] = peer
        marks[(r, cursor[r])] = f"{a} waits for {want} on rank {peer}"
        lines.append(f"rank {r} at {a} waits for {want} on rank {peer}")
    cycle = _cycle(waits_on)
    named = " -> ".join(f"rank {r} ({plan.actions[r][cursor[r]]})" for r in cycle)
    return (
        f"schedule deadlocks: cycle {named} -> rank {cycle[0]}; "
        + "; ".join(lines)
        + "\n"
        + render(plan, marks)
    )


def _cycle(waits_on: dict[int, int]) -> list[int]:
    """The wait-for cycle reached from the lowest stuck rank (every stuck rank waits on a stuck
    rank, since a finished rank has produced everything it owns)."""
    seen: list[int] = []
    r = min(waits_on)
    while r not in seen:
        seen.append(r)
        r = waits_on[r]
    return seen[seen.index(r) :]
