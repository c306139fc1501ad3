"""Enumerate the layouts of N ranks, keep those that fit memory, rank them by predicted step time.

Two passes, so thousands of GPUs answer in seconds: a screen prices every candidate in closed
form (the schedule's textbook bubble, its peak stash count), then the `exact` best of the
screen get the checker's exact dry run (predict.py) and are ranked on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mpipipe.errors import ConfigError
from mpipipe.plan.cost import GPT, Layout, StageCosts, action_costs, allreduce_time, memory
from mpipipe.plan.machine import Machine
from mpipipe.plan.predict import Prediction, predict

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Space:
    """What may vary; None: everything the model and schedules allow."""

    pp: int | None = None
    dp: int | None = None
    tp: int | None = None
    schedules: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv")
    microbatches: int | None = None
    recompute: tuple[str, ...] = ("none", "selective", "full")
    zero: tuple[int, ...] = (0, 1)
    sp: tuple[bool, ...] = (False, True)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model: GPT, ranks: int, machine: Machine, space: Space) -> Iterator[Layout]:
    for tp in divisors(ranks):
        if space.tp is not None and tp != space.tp:
            continue
        if space.tp is None and (tp > machine.devices_per_node or model.heads % tp
                                 or model.vocab % tp):  # fmt: skip
            continue
        for pp in divisors(ranks // tp):
            dp = ranks // (tp * pp)
            if pp > model.layers or (space.pp or pp) != pp or (space.dp or dp) != dp:
                continue
            if model.global_batch % dp:
                continue
            per_replica = model.global_batch // dp
            ms = [space.microbatches] if space.microbatches else [
                per_replica // b for b in MICRO_BATCHES if per_replica % b == 0
            ]  # fmt: skip
            for m in ms:
                if m < 1 or per_replica % m:
                    continue
                for name, v in _schedules(space.schedules, pp, m, model.layers):
                    for rc in space.recompute:
                        for z in space.zero if dp > 1 else (0,):
                            for sp in space.sp if tp > 1 else (False,):
                                yield Layout(pp, dp, tp, name, v, m, rc, z, sp)


def _schedules(names: tuple[str, ...], pp: int, m: int, layers: int) -> Iterator[tuple[str, int]]:
    if pp == 1:  # every schedule is the same sequence of F, B, W on one stage
        yield names[0] if "1f1b" not in names else "1f1b", 1
        return
    for name in names:
        if name == "interleaved":
            for v in (2, 4):
                if m % pp == 0 and pp * v <= layers:
                    yield name, v
        elif name == "zbv":
            if 2 * pp <= layers:
                yield name, 2
        else:
            yield name, 1


def peak_stash_bound(name: str, pp: int, m: int, v: int) -> int:
    """The first rank's peak stash (chunk activations) in closed form, for the screen."""
    if name == "gpipe":
        return m
    if name == "interleaved":
        return min(m * v, 2 * (pp - 1) + (v - 1) * pp + 1)
    if name == "zbv":
        return 2 * min(pp, m)
    return min(pp, m)


def screen(model: GPT, layout: Layout, machine: Machine) -> tuple[float, float]:
    """(step time, peak memory of the first rank) in closed form."""
    idle = {"zb-h1": 1 / 3, "zbv": 1 / 6}.get(layout.schedule, 1.0)

    def pipeline(c: StageCosts) -> tuple[float, float]:  # (busy time per rank, step)
        per_mb = max(f + b + w for f, b, w in zip(c.f, c.b, c.w, strict=True)) * layout.v
        fill = (layout.pp - 1) * (per_mb / layout.v * idle + 2 * c.p2p)
        return layout.microbatches * per_mb, layout.microbatches * per_mb + fill

    busy = None  # the ranks busy at once, as predict prices the time per action (busy_ranks)
    if machine.action_overhead_by_busy:
        work, span = pipeline(action_costs(model, layout, machine.with_action_overhead(0.0)))
        busy = layout.ranks * work / span
    step = pipeline(action_costs(model, layout, machine, busy))[1]
    link = machine.collective_link(layout.tp, layout.dp)  # as predict's gradient reduction
    params = memory(model, layout, (0,), 0).params * layout.v
    tail = allreduce_time(link, min(25e6, params * 4), layout.dp)
    actions, computed = 3 * layout.microbatches * layout.v, None if model.emulate else step
    tail += machine.reduce_overhead(layout.ranks, layout.dp, actions, computed)
    stash = peak_stash_bound(layout.schedule, layout.pp, layout.microbatches, layout.v)
    chunks = tuple(range(0, layout.pp * layout.v, layout.pp))
    mem = memory(model, layout, chunks, stash).total
    return step + tail, mem


def search(model: GPT, ranks: int, machine: Machine, space: Space, exact: int = 48
           ) -> tuple[list[Prediction], int]:  # fmt: skip
    """(the predictions that fit memory, fastest first; how many layouts were considered)."""
    limit = machine.memory_gib * 2**30
    screened = []
    n = 0
    for layout in candidates(model, ranks, machine, space):
        n += 1
        t, mem = screen(model, layout, machine)
        if mem <= limit * 1.05:  # the exact pass decides at the margin
            screened.append((t, layout))
    if not screened:
        raise ConfigError(
            f"no layout of {ranks} ranks fits {machine.memory_gib:g} GiB per device among {n} "
            "considered (use more ranks, a smaller --global-batch, or --dtype bf16)"
        )
    screened.sort(key=lambda x: x[0])
    out = []
    for _, layout in screened[:exact]:
        try:
            p = predict(model, layout, machine)
        except ConfigError:
            continue
        if p.peak_memory <= limit:
            out.append(p)
    out.sort(key=lambda p: p.step_time)
    return out, n


def reason(p: Prediction, best: Prediction, limit_gib: float) -> str:
    """One line: why this layout is where it is."""
    gib = p.peak_memory / 2**30
    mem = f"peak {gib:.1f} of {limit_gib:g} GiB"
    if p is best:
        return f"fastest: bubble {p.bubble:.0%}, {mem}"
    slower = p.step_time / best.step_time - 1
    diffs = {k: p.breakdown[k] - best.breakdown.get(k, 0.0) for k in p.breakdown}
    diffs["compute on stage 0"] = (
        p.breakdown["F/B/W stage 0"] * p.layout.microbatches
        - best.breakdown["F/B/W stage 0"] * best.layout.microbatches
    )
    diffs.pop("F/B/W stage 0")
    diffs.pop("pipeline")
    diffs.pop("p2p message")
    worst = max(diffs, key=lambda k: diffs[k])
    return f"+{slower:.1%}: more {worst} ({diffs[worst] * 1e3:+.1f} ms), {mem}"
