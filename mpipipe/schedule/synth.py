"""Schedules made to measure: the fastest plan we can find for (pp, m, a memory cap, costs).

Memory is counted in micro-batch units: a rank's peak of stashed chunk-activations divided by
its chunks (a chunk of a v-chunk schedule holds 1/v of the rank's layers). Costs are given per
pipeline rank's share of the model (one number, or one per rank in depth order); a virtual
stage of a v-chunk schedule costs 1/v of the share it lies in, so schedules with different
chunk counts are compared on the same model. Or costs are a `Scale`: a function from (pp,
chunks per rank) to the costs of every virtual stage, which is what a model's measured layers
give (`train --schedule auto`: the layers each virtual stage holds, summed). Latency is per hop.

`synthesize` runs the list scheduler (listsched.py) for one chunk per rank and for a V, under
the cap and with the real costs, over a few policies (B-first or F-first ties, how long a W
yields), adds every named schedule that fits the cap as a seed, keeps the fastest, and improves
it by a local search that swaps adjacent actions where the later one was held up by the
earlier. Every candidate is checked by the checker; ties go to the first found, so the same
inputs give the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpipipe.errors import ConfigError, ScheduleError
from mpipipe.schedule.actions import Plan, linear_stages
from mpipipe.schedule.check import Costs, Report, check, simulate
from mpipipe.schedule.deps import needs
from mpipipe.schedule.listsched import list_schedule, v_stages

POLICIES = (("BFW", 0.0), ("BFW", 1.0), ("FBW", 0.0))  # (tie order, how long a W yields)


def memory(report: Report) -> float:
    """The peak stash of the worst rank in micro-batch units (chunk-activations / chunks)."""
    plan = report.plan
    return max(p / len(s) for p, s in zip(report.peak_stash, plan.stages, strict=True))


def stage_costs(costs: Costs, pp: int, chunks: int) -> Costs:
    """Per virtual stage costs of a `chunks`-per-rank plan from per-rank-share `costs`."""

    def per_stage(value: float | Sequence[float]) -> list[float]:
        shares = [float(value)] * pp if isinstance(value, (int, float)) else list(value)
        if len(shares) != pp:
            raise ConfigError(
                f"stage costs give {len(shares)} values for --pp {pp} (one per pipeline rank, "
                "in depth order)"
            )
        return [shares[k // chunks] / chunks for k in range(pp * chunks)]

    return Costs(per_stage(costs.f), per_stage(costs.b), per_stage(costs.w), costs.latency)


Scale = Callable[[int, int], Costs]  # (pp, chunks per rank) -> costs per virtual stage


def as_scale(costs: Costs | Scale) -> Scale:
    """Per-rank-share costs as a Scale (each chunk 1/v of its rank's share); a Scale as it is."""
    if isinstance(costs, Costs):
        return lambda pp, v: stage_costs(costs, pp, v)
    return costs


def evaluate(plan: Plan, costs: Costs | Scale) -> Report:
    """The checker's report for `plan` with `costs` scaled to its chunks."""
    return check(plan, as_scale(costs)(plan.pp, len(plan.stages[0])))


@dataclass(frozen=True)
class Result:
    plan: Plan
    report: Report
    origin: str  # what the winner grew from: 'list v=1 BFW w_delay=0', 'seed zbv', ...
    improved: int  # swaps the local search kept


def synthesize(
    pp: int,
    m: int,
    cap: float,
    costs: Costs | Scale,
    seeds: Sequence[Plan] = (),
    budget: int = 60,
    chunks: Sequence[int] = (1, 2),
) -> Result:
    """The fastest schedule found whose memory (see `memory`) is at most `cap`."""
    if cap < 1:
        raise ConfigError(
            f"--memory {cap:g} is below one micro-batch: no schedule can hold less "
            "(use --memory 1 or more)"
        )
    best: tuple[float, float, int] | None = None
    found: tuple[Plan, Report, str] | None = None
    tried = 0

    def consider(plan: Plan, origin: str) -> None:
        nonlocal best, found, tried
        report = evaluate(plan, costs)
        key = (round(report.step_time, 9), memory(report), tried)
        tried += 1
        if memory(report) <= cap + 1e-9 and (best is None or key < best):
            best, found = key, (plan, report, origin)

    for stages in [s for s in (linear_stages(pp), v_stages(pp)) if len(s[0]) in chunks]:
        v = len(stages[0])
        limit = math.floor(cap * v + 1e-9)
        if limit < v:
            continue
        try:
            scaled = as_scale(costs)(pp, v)
        except ConfigError:  # a model with too few layers for v chunks per rank
            if v == 1:  # costs that do not fit even one chunk per rank: the caller's to fix
                raise
            continue
        for order, w_delay in POLICIES:
            plan = list_schedule("synth", m, stages, limit, scaled, order, w_delay)
            consider(plan, f"list v={v} {order} w_delay={w_delay:g}")
    for seed in [s for s in seeds if len(s.stages[0]) in chunks]:
        consider(_renamed(seed, "synth"), f"seed {seed.name}")
    assert found is not None  # cap >= 1 always admits the one-chunk list schedule
    plan, report, origin = found
    plan, report, kept = local_search(plan, report, cap, costs, budget)
    return Result(plan, report, origin, kept)


def local_search(
    plan: Plan, report: Report, cap: float, costs: Costs | Scale, budget: int
) -> tuple[Plan, Report, int]:
    """Swap adjacent actions on a rank where the second waited for the first although its input
    was ready; keep a swap when the step gets shorter within the cap. At most `budget` tries."""
    scaled = as_scale(costs)(plan.pp, len(plan.stages[0]))
    kept = 0
    while budget > 0:
        for r, i in _held_up(report, scaled):
            budget -= 1
            rows = [list(row) for row in plan.actions]
            rows[r][i], rows[r][i + 1] = rows[r][i + 1], rows[r][i]
            trial = plan.with_actions(rows)
            try:
                got = simulate(trial, scaled)
            except ScheduleError:
                got = None
            if got and got.step_time < report.step_time - 1e-9 and memory(got) <= cap + 1e-9:
                plan, report, kept = trial, got, kept + 1
                break
            if budget <= 0:
                break
        else:
            break
    return plan, check(plan, scaled), kept


def _held_up(report: Report, costs: Costs) -> list[tuple[int, int]]:
    """(rank, i) where action i + 1 started when action i ended, could have started earlier,
    and may legally go first (different chunk, or same chunk and neither kind nor micro-batch
    in common)."""
    plan = report.plan
    n = plan.n_stages
    finish: dict[tuple[str, int, int], tuple[float, int]] = {}
    for r, row in enumerate(report.spans):
        for _, end, a in row:
            finish[(a.kind, a.mb, plan.stages[r][a.chunk])] = (end, r)
    out = []
    for r, row in enumerate(report.spans):
        for i in range(len(row) - 1):
            (_, e0, a), (s1, _, b) = row[i], row[i + 1]
            if s1 > e0 + 1e-9 or (a.chunk == b.chunk and (a.kind == b.kind or a.mb == b.mb)):
                continue
            k = plan.stages[r][b.chunk]
            ready = max(
                [0.0]
                + [
                    finish[d][0] + (costs.latency if finish[d][1] != r else 0.0)
                    for d in needs(b.kind, b.mb, k, n)
                ]
            )
            if ready < s1 - 1e-9:
                out.append((r, i))
    return out


def _renamed(plan: Plan, name: str) -> Plan:
    return Plan(name, plan.microbatches, plan.stages, plan.actions)


def named(
    pp: int,
    m: int,
    costs: Costs | Scale,
    names: Sequence[str],
    build: Callable[[str, int, int], Plan],
) -> list[tuple[str, Report]]:
    """Every named schedule that builds for (pp, m), with its report (skipping those that
    refuse the case, e.g. interleaved when m is not a multiple of pp, or whose chunks the
    costs' model cannot split into)."""
    out = []
    for name in names:
        try:
            plan = build(name, pp, m)
        except ConfigError:
            continue
        try:
            out.append((name, evaluate(plan, costs)))
        except ConfigError:
            if len(plan.stages[0]) == 1:  # costs that do not fit one chunk per rank
                raise
    return out


def read_stage_costs(text: str, latency: float = 0.0) -> Costs:
    """Per-rank-share costs from a file: one line 'F=..,B=..,W=..' per pipeline rank in depth
    order ('#' comments); `latency` per hop."""
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    shares = [Costs.parse(ln) for ln in lines if ln]
    if not shares:
        raise ValueError("the stage costs file has no lines (one 'F=..,B=..,W=..' per rank)")
    return Costs(
        [float(c.of("F")) for c in shares],
        [float(c.of("B")) for c in shares],
        [float(c.of("W")) for c in shares],
        latency,
    )


@dataclass(frozen=True)
class Row:
    name: str
    report: Report

    @property
    def memory(self) -> float:
        return memory(self.report)


def compare(
    pp: int,
    m: int,
    cap: float,
    costs: Costs | Scale,
    names: Sequence[str],
    build: Callable[[str, int, int], Plan],
) -> tuple[list[Row], Result]:
    """Every named schedule's report for (pp, m, costs), and the synthesized schedule under
    `cap` seeded with the named ones that fit it."""
    rows = [Row(name, report) for name, report in named(pp, m, costs, names, build)]
    seeds = [r.report.plan for r in rows if r.memory <= cap + 1e-9]
    return rows, synthesize(pp, m, cap, costs, seeds)


def side_by_side(rows: Sequence[Row], result: Result, cap: float) -> str:
    """The comparison as a table: step time, bubble, peak memory, and whether it fits `cap`."""
    out = [
        f"| schedule    | step time | bubble | peak memory (micro-batches) | fits {cap:g} |",
        "|-------------|-----------|--------|-----------------------------|---------|",
    ]
    for name, report in [(r.name, r.report) for r in rows] + [("synth", result.report)]:
        mem = memory(report)
        fits = "yes" if mem <= cap + 1e-9 else "no"
        out.append(
            f"| {name:<11} | {report.step_time:9.4g} | {report.bubble:6.3f} | {mem:27.4g} | "
            f"{fits:<7} |"
        )
    fitting = [r.report.step_time for r in rows if r.memory <= cap + 1e-9]
    v = len(result.plan.stages[0])
    out.append(
        f"synth: {v} chunk(s) per rank, grown from {result.origin}, {result.improved} swap(s) "
        "kept by the local search; "
        + (
            f"{min(fitting) / result.report.step_time:.3f}x the best named schedule that fits"
            if fitting
            else "no named schedule fits the cap"
        )
    )
    return "\n".join(out)


TRAIN_COSTS = Costs(1.0, 2.0, 1.0)  # `train --schedule auto` without measured costs: B = 2F


def for_training(
    pp: int,
    m: int,
    cap: float,
    chunks: Sequence[int],
    names: Sequence[str],
    build: Callable[[str, int, int], Plan],
    costs: Costs | Scale = TRAIN_COSTS,
) -> Plan:
    """`train --schedule auto --memory K`: the synthesized plan for `costs` (equal stages and
    TRAIN_COSTS unless measured or emulated ones are given), on the chunk counts the model's
    layers allow; named 'auto'."""
    reports = named(pp, m, costs, names, build)
    fit = [report.plan for _, report in reports if memory(report) <= cap + 1e-9]
    return _renamed(synthesize(pp, m, cap, costs, fit, chunks=chunks).plan, "auto")
