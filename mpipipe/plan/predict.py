"""Predict one layout's step: the schedule's exact dry run with per-action costs, then the
gradient reduction overlapped as the runtime does it, then the optimizer.

The runtime (parallel/data_parallel.py) groups a stage's gradients into buckets of whole layers
in backward order (up to --bucket-mb) and starts a bucket's all-reduce as soon as the last
weight-gradient work of the step has finished its layers; the reductions run one after another
on the link and the optimizer waits for all. Here: a layer is final when its chunk's last W ends
(the W of a chunk works layer by layer, last layer first, so its layers finish in turn); buckets
start at max(ready, previous bucket done); without overlap (--overlap off) all start when the
rank's last action ends. ZeRO-1 reduce-scatters the same way and all-gathers
the updated parameters after the optimizer step, which nothing overlaps. A machine file calibrated
here adds what the alpha-beta model of the links leaves out, per step of a job of N ranks
(machine.py): the gradient phase's waits when dp > 1 (replicas drift apart; ranks wait for a
core) and the step's fixed work outside the pipeline. Megatron's runtime (runtimes.py) differs:
its layers are final across the chunk's last B and W (one autograd pass), its gradients are
16-bit, and its first and last stages then all-reduce the tied embeddings' gradient (counted in
the breakdown's "dp reduce (not hidden)"). The gradient all-reduce runs on
Machine.collective_link (one NIC per member of the group in a node, where the file says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from mpipipe import schedule
from mpipipe.memory import shard_params
from mpipipe.plan.cost import (
    GPT,
    Layout,
    StageMemory,
    action_costs,
    allreduce_time,
    bounds,
    memory,
)
from mpipipe.plan.machine import Link, Machine
from mpipipe.plan.runtimes import runtime


@dataclass
class Prediction:
    layout: Layout
    step_time: float
    tokens_per_s: float
    mfu: float
    bubble: float
    memory: list[StageMemory]  # per pipeline rank
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds, see explain()

    @property
    def peak_memory(self) -> float:
        return max(m.total for m in self.memory)

    def explain(self) -> str:
        gib = 2**30
        parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.breakdown.items())
        mem = "; ".join(
            f"rank {r}: {m.weights / gib:.2f} weights + {m.stash / gib:.2f} stash + "
            f"{m.buffers / gib:.2f} buffers GiB"
            for r, m in enumerate(self.memory)
        )
        return f"  time: {parts}\n  memory: {mem}"


@lru_cache(maxsize=512)
def plan_of(name: str, pp: int, m: int, v: int) -> tuple[schedule.Plan, tuple[int, ...]]:
    """The checked plan and its per-rank peak stash (cached: costs do not change them)."""
    plan = schedule.build(name, pp, m, v if name in ("interleaved", "zbv") else None)
    report = schedule.check(plan)
    return plan, tuple(report.peak_stash)


def busy_ranks(model: GPT, layout: Layout, machine: Machine) -> float:
    """How many of the layout's ranks are inside an action at once, on average: its ranks
    times its schedule's utilisation (1 - bubble) at the machine's costs without the time per
    action, which depends on it where ranks share cores (Machine.action_overhead). A second
    simulation of the schedule: predict runs it only for machine files with that table."""
    plan, _ = plan_of(layout.schedule, layout.pp, layout.microbatches, layout.v)
    costs = action_costs(model, layout, machine.with_action_overhead(0.0))
    report = schedule.simulate(plan, schedule.Costs(costs.f, costs.b, costs.w, costs.p2p))
    return layout.ranks * (1.0 - report.bubble)


def predict(model: GPT, layout: Layout, machine: Machine, bucket_mb: float = 25.0) -> Prediction:
    plan, peaks = plan_of(layout.schedule, layout.pp, layout.microbatches, layout.v)
    busy = busy_ranks(model, layout, machine) if machine.action_overhead_by_busy else None
    costs = action_costs(model, layout, machine, busy)
    report = schedule.simulate(plan, schedule.Costs(costs.f, costs.b, costs.w, costs.p2p))
    mems = [memory(model, layout, chunks, peaks[r]) for r, chunks in enumerate(plan.stages)]
    grad_width = runtime(layout.runtime).grad_width_16 if model.width == 2 else model.width
    link = machine.collective_link(layout.tp, layout.dp)
    fused = runtime(layout.runtime).fused_backward
    tied = _tied_embeddings(model, layout, machine, grad_width)  # first and last rank only
    parts, names = bounds(model, layout), model.names
    ends, reduce_tail, opt = [], 0.0, 0.0
    actions = max(len(spans) for spans in report.spans)
    for r, spans in enumerate(report.spans):
        compute_end = spans[-1][1] if spans else 0.0
        ready: list[tuple[float, float]] = []  # (time a layer is final, its gradient bytes)
        mine = [i for k in plan.stages[r] for i in parts[k]]
        size_of = {i: shard_params(names[i], model.meta, model.layer_params(names[i]), layout.tp)
                   for i in mine}  # fmt: skip
        for chunk, k in enumerate(plan.stages[r]):
            last_w = max((s for s in spans if s[2].kind == "W" and s[2].chunk == chunk),
                         key=lambda s: s[1])  # fmt: skip
            start = last_w[0]
            if fused:  # one backward pass: layers finish in turn over the last B and W
                start = max(s[0] for s in spans if s[2].kind == "B" and s[2].chunk == chunk)
            layers = list(reversed(parts[k]))
            for j, i in enumerate(layers):
                t = start + (last_w[1] - start) * (j + 1) / len(layers)
                ready.append((t, size_of[i] * grad_width))
        clock = _buckets(ready, compute_end, layout, link, bucket_mb)
        # the rounds and the replicas' drift; computing replicas drift from the step's start
        # (their last synchronisation) to their pipeline's end, idle stretches included: a
        # stage waits on the jitter of the ranks upstream of it
        computed = None if model.emulate else compute_end
        waits = machine.reduce_overhead(layout.ranks, layout.dp, actions, computed)
        end = max(compute_end, clock) + waits + (tied if r in (0, layout.pp - 1) else 0.0)
        ends.append(end)
        reduce_tail = max(reduce_tail, end - compute_end)
        opt = max(opt, _optimizer(model, layout, machine, mems[r].params, link))
    step = max(ends) + opt + machine.step_overhead(layout.ranks)
    tokens = model.global_batch * model.seq_len
    flops = model.model_flops(model.global_batch)
    mfu = flops / step / (machine.peak(model.dtype) * layout.ranks)
    return Prediction(
        layout,
        step,
        tokens / step,
        mfu,
        report.bubble,
        mems,
        {
            "pipeline": report.step_time,
            "bubble": report.step_time * report.bubble,
            "dp reduce (not hidden)": reduce_tail,
            "optimizer": opt,
            "step overhead": machine.step_overhead(layout.ranks),
            "p2p message": costs.p2p + costs.exchange,
            "F/B/W stage 0": costs.f[0] + costs.b[0] + costs.w[0],
        },
    )


def _buckets(
    ready: list[tuple[float, float]], end: float, layout: Layout, link: Link, bucket_mb: float
) -> float:
    """When the rank's last gradient bucket is reduced: layers (ready time, bytes) fill buckets
    in the order they become final; a bucket starts when its last layer is final (or at `end`,
    the rank's last action, without overlap) and after the previous bucket."""
    if layout.dp == 1:
        return 0.0
    clock, size, due = 0.0, 0.0, 0.0
    for t, nbytes in sorted(ready):
        if size and size + nbytes > bucket_mb * 1e6:
            clock = max(clock, due) + _reduce(link, size, layout)
            size = 0.0
        size, due = size + nbytes, t if layout.overlap else end
    return max(clock, due) + _reduce(link, size, layout) if size else clock


def _reduce(link: Link, nbytes: float, layout: Layout) -> float:
    """One bucket: an all-reduce, or ZeRO-1's reduce-scatter (half of its time)."""
    t = allreduce_time(link, nbytes, layout.dp)
    return t / 2 if layout.zero else t


def _tied_embeddings(model: GPT, layout: Layout, machine: Machine, width: int) -> float:
    """Megatron's GPT ties the output layer to the word embeddings: with pp > 1 the last stage
    holds a copy, and after the data-parallel reduction the first and last stages all-reduce
    its gradient, V x C / t elements (megatron/training.py, the embedding group). 0 for mpipipe
    (GPT here models no tie)."""
    if not runtime(layout.runtime).tied_embeddings or layout.pp == 1:
        return 0.0
    nbytes = model.vocab * model.d_model / layout.tp * width
    return allreduce_time(machine.link(layout.tp * layout.dp * (layout.pp - 1)), nbytes, 2)


def _optimizer(model: GPT, layout: Layout, machine: Machine, params: int, link: Link) -> float:
    """AdamW/SGD on the rank's (shard of) parameters: memory-bound, ~7 fp32 streams per
    parameter (16-bit training: the runtime's bytes, runtimes.py), or with a profile the
    runtime's optimizer timed here;
    ZeRO-1 updates 1/dp of them, then all-gathers."""
    streams = runtime(layout.runtime).optimizer_16 if model.width == 2 else 7 * 4
    mine = params / (layout.dp if layout.zero else 1)
    if model.profile is not None:
        t = mine * model.profile.optimizer_rate(model.optimizer, layout.tp)
    else:
        t = machine.memory_time(mine * streams)
    if layout.zero and layout.dp > 1:
        t += allreduce_time(link, params * model.width, layout.dp) / 2
    return t
