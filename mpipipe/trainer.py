"""The training loop and its Python API: `train(config, model=None, dataset=None, comm=None)`.

One step on one rank: run the checked, lowered plan (losses on the last stage, weight gradients
accumulated in micro-batch order), then ONE small all-reduce that carries every layer's squared
gradient norm and the loss, then clip and step the optimizer. Each layer's entry in that vector is
filled by its owner alone and the others add exact zeros, so the norm (summed in layer order) and
thus every update are bitwise the same for every pipeline size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI

from mpipipe import optim, schedule
from mpipipe.config import TrainConfig
from mpipipe.data import ByteDataset, resolve
from mpipipe.emulate import EmulatedStage, Emulation
from mpipipe.errors import ConfigError
from mpipipe.metrics import MetricsFile, log_line
from mpipipe.model import Model, gpt, mlp
from mpipipe.parallel.grid import Grid
from mpipipe.parallel.p2p import P2P, max_tag
from mpipipe.partition import uniform
from mpipipe.runtime import Executor, MicroBatches, Stage
from mpipipe.xp import dtype_of, get, to_numpy


class Dataset(Protocol):
    def batch(self, step: int, split: str, size: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class TrainResult:
    """What a run returns on every rank. `params` holds this rank's parameters (host copies)."""

    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    peak_stash: list[int] = field(default_factory=list)  # measured, per pipeline rank

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"])

    @property
    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.history if "eval_loss" in r]


def build_model(cfg: TrainConfig) -> Model:
    if cfg.model == "gpt":
        return gpt(cfg.layers, cfg.d_model, cfg.heads, cfg.seq_len)
    return mlp(cfg.layers, cfg.d_model, cfg.seq_len)


@dataclass
class Job:
    """Everything decided before heavy work: config, model recipe, checked plan, data source."""

    cfg: TrainConfig
    model: Model
    plan: schedule.Plan
    report: schedule.Report
    dataset: Any
    emulation: Emulation | None = None


def prepare(
    cfg: TrainConfig, world_size: int, model: Model | None = None, dataset: Any = None
) -> Job:
    """All validation, cheap and identical on every rank; raises ConfigError with the fix."""
    cfg = cfg.validate(world_size)
    model = model or build_model(cfg)
    plan = make_plan(cfg)
    cfg = cfg.replace(pp=plan.pp)
    chunks = len(plan.stages[0])
    uniform([s.body for s in model.layers], plan.n_stages, chunks)  # stages <= layers
    cfg.check_launch(world_size)
    emulation = Emulation.parse(cfg.emulate) if cfg.emulate else None
    report = schedule.check(plan, emulation.costs(chunks) if emulation else None)
    top = max_tag(plan.n_stages, cfg.microbatches)
    if top > 32767:  # the least MPI.TAG_UB the standard guarantees
        raise ConfigError(
            f"--microbatches {cfg.microbatches} with {plan.n_stages} stages needs "
            f"message tags up to {top} > 32767 (use fewer micro-batches)"
        )
    if dataset is None:
        dataset = ByteDataset(resolve(cfg.data), cfg.seq_len, cfg.seed)
    if hasattr(dataset, "check"):
        dataset.check()
    return Job(cfg, model, plan, report, dataset, emulation)


def make_plan(cfg: TrainConfig) -> schedule.Plan:
    """The configured schedule, or the hand-written one from --schedule-file."""
    assert cfg.pp is not None
    if cfg.schedule_file is None:
        return schedule.build(cfg.schedule, cfg.pp, cfg.microbatches, cfg.virtual_stages)
    path = Path(cfg.schedule_file)
    if not path.is_file():
        raise ConfigError(f"--schedule-file {path}: no such file (one line of actions per rank)")
    try:
        plan = schedule.from_text(path.read_text(), cfg.microbatches, name=path.name)
    except ValueError as e:
        raise ConfigError(f"--schedule-file {path}: {e}") from None
    if plan.pp != cfg.pp:
        raise ConfigError(
            f"--schedule-file {path} has {plan.pp} rank lines but --pp is {cfg.pp} "
            f"(launch {plan.pp} ranks, or write one line per rank)"
        )
    return plan


def agree(comm: MPI.Comm, work: Callable[[], Job]) -> Job:
    """Run `work` on every rank; if it raised ConfigError anywhere, raise it everywhere.

    One small collective, so a rank that alone finds a problem (a file missing on its node) makes
    every rank stop together instead of leaving the others to hang.
    """
    try:
        job, err = work(), None
    except ConfigError as e:
        job, err = None, str(e)
    errors = comm.allgather(err)
    bad = [r for r, e in enumerate(errors) if e]
    if bad:
        msg = errors[bad[0]]
        if len(bad) < comm.size:
            msg += f" [on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}]"
        raise ConfigError(msg)
    assert job is not None
    return job


def train(
    cfg: TrainConfig,
    model: Model | None = None,
    dataset: Any = None,
    comm: MPI.Comm | None = None,
    out: Any = sys.stdout,
) -> TrainResult:
    """Train `model` (default: built from `cfg`) through the pipeline; call on every rank."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    job = agree(comm, lambda: prepare(cfg, comm.Get_size(), model, dataset))
    grid = Grid.create(comm)
    try:
        return _Run(job, grid, out).loop()
    finally:
        grid.free()


class _Run:
    def __init__(self, job: Job, grid: Grid, out: Any) -> None:
        self.job, self.cfg, self.grid, self.out = job, job.cfg, grid, out
        self.rank = grid.stage_rank
        self.xp = get("numpy")
        self.dtype = dtype_of(self.cfg.dtype)
        plan, b = job.plan, self.cfg.micro_batch
        if job.emulation:
            self.stage: Any = EmulatedStage(
                job.model, plan, self.rank, job.emulation, b, self.dtype, self.xp
            )
        else:
            self.stage = Stage(job.model, plan, self.rank, self.cfg.seed, self.dtype, self.xp)
        p2p = P2P(grid.pp_comm)

        def executor(p: schedule.Plan) -> Executor:
            return Executor(
                schedule.lower(p), self.rank, self.stage, job.model, p2p, b, self.dtype, self.xp
            )

        self.train_exec = executor(plan)
        self.eval_exec = executor(schedule.forward_only(plan))
        self.opt = optim.make(self.cfg.optimizer, self.stage.params, self.cfg)
        self.n_layers = len(job.model.layers)
        self.n_stages = plan.n_stages
        self.first = 0 in self.stage.ids
        self.last = plan.n_stages - 1 in self.stage.ids
        self.fault = _fault_from_env()

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.out, flush=True)

    def micro_batches(self, step: int, split: str) -> MicroBatches:
        if not (self.first or self.last):
            return MicroBatches(None, None)
        x, y = self.job.dataset.batch(step, split, self.cfg.global_batch)
        m, b = self.cfg.microbatches, self.cfg.micro_batch
        xs = [self.xp.asarray(x[i * b : (i + 1) * b]) for i in range(m)] if self.first else None
        ys = [self.xp.asarray(y[i * b : (i + 1) * b]) for i in range(m)] if self.last else None
        return MicroBatches(xs, ys)

    def reduce(self, per_layer: dict[int, float], extras: list[float]) -> tuple[list, list]:
        """Sum per-layer values and a few scalars over the pipeline in ONE all-reduce. Each
        per-layer entry has one owner and the other ranks add exact zeros."""
        vec = np.zeros(self.n_layers + len(extras))
        for i, v in per_layer.items():
            vec[i] = v
        vec[self.n_layers :] = extras
        self.grid.pp_comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
        return list(vec[: self.n_layers]), list(vec[self.n_layers :])

    def action_costs(self) -> list[float]:
        """This rank's mean F, B, W seconds per virtual stage in the last run, as 3 x n_stages
        entries (zeros for stages owned elsewhere): the simulator's input."""
        sums = np.zeros((3, self.n_stages))
        counts = np.zeros((3, self.n_stages))
        for t0, t1, a in self.train_exec.spans:
            kind, k = "FBW".index(a.kind), self.stage.ids[a.chunk]
            sums[kind, k] += t1 - t0
            counts[kind, k] += 1
        return list((sums / np.maximum(counts, 1)).ravel())

    def predicted(self, costs: list[float]) -> schedule.Report:
        if self.job.emulation:
            return self.job.report
        per = np.asarray(costs).reshape(3, self.n_stages)
        return schedule.check(self.job.plan, schedule.Costs(*(list(row) for row in per)))

    def evaluate(self) -> float:
        total = 0.0
        for i in range(self.cfg.eval_batches):
            losses = self.eval_exec.run(self.micro_batches(i, "eval"))
            _, (loss,) = self.reduce({}, [sum(losses)])
            total += loss / self.cfg.microbatches
        return total / self.cfg.eval_batches

    def step(self, step: int) -> dict[str, Any]:
        cfg, pp = self.cfg, self.job.plan.pp
        t0 = time.perf_counter()
        if self.fault == (self.rank, step):
            raise RuntimeError(
                f"fault injected on rank {self.rank} at step {step} (MPIPIPE_FAULT)"
            )
        batch = self.micro_batches(step, "train")
        self.stage.zero_grad()
        ex = self.train_exec
        losses = ex.run(batch)
        sq = {
            i: math.fsum(_sq_norm(self.stage.grads[n]) for n in names)
            for i, names in self.stage.layer_params.items()
        }
        busy, wall = np.zeros(pp), np.zeros(pp)  # one slot per rank, so the sum is a gather
        busy[self.rank], wall[self.rank] = ex.busy, ex.wall
        extras = [sum(losses), *busy, *wall, *self.action_costs()]
        per_layer, (loss_sum, *rest) = self.reduce(sq, extras)
        busy, wall, costs = rest[:pp], rest[pp : 2 * pp], rest[2 * pp :]
        span = max(wall)  # the pipeline's step: the slowest rank's run
        norm = math.sqrt(math.fsum(per_layer))
        factor = optim.clip_factor(norm, cfg.clip)
        if factor < 1.0:
            for g in self.stage.grads.values():
                g *= factor
        lr = optim.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        self.opt.step(self.stage.grads, lr)
        dt = time.perf_counter() - t0
        tokens = cfg.global_batch * self.job.model.meta.get("seq_len", 1)  # predictions
        rec: dict[str, Any] = {
            "step": step + 1,
            "loss": loss_sum / cfg.microbatches,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            "pipeline_time_s": span,
            "bubble": 1.0 - sum(busy) / (pp * span) if span > 0 else 0.0,  # mean idle fraction
        }
        if self.rank == 0:  # only rank 0 reports; the simulation is cheap but not free
            report = self.predicted(costs)
            rec["bubble_predicted"] = report.bubble
            rec["pipeline_time_predicted_s"] = report.step_time
        return rec

    def loop(self) -> TrainResult:
        cfg = self.cfg
        self.say(describe(self.job))
        metrics = MetricsFile(cfg.metrics_file if self.rank == 0 else None)
        result = TrainResult(cfg)
        t_start = time.perf_counter()
        try:
            for step in range(cfg.steps):
                rec = self.step(step)
                if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                    rec["eval_loss"] = self.evaluate()
                result.history.append(rec)
                metrics.write(rec)
                if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps:
                    self.say(log_line(rec, cfg.steps))
        finally:
            metrics.close()
        result.peak_stash = self.grid.pp_comm.allgather(self.train_exec.peak_stash)
        self.say(summary_line(result, time.perf_counter() - t_start))
        result.params = {k: to_numpy(v).copy() for k, v in self.stage.params.items()}
        return result


def summary_line(result: TrainResult, wall: float) -> str:
    h, cfg = result.history, result.config
    later = h[1:] or h  # the first step includes one-time costs
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in h)
    line = (
        f"done: {cfg.steps} steps in {wall:.1f} s | final loss {h[-1]['loss']:.4f} | "
        f"eval loss {h[-1]['eval_loss']:.4f} (first eval {result.eval_losses[0]:.4f}) | "
        f"{tokens / wall:.0f} tok/s overall | bubble measured "
        f"{sum(r['bubble'] for r in later) / len(later):.3f}"
    )
    if "bubble_predicted" in h[-1]:
        predicted = sum(r["bubble_predicted"] for r in later) / len(later)
        line += f", predicted {predicted:.3f}"
    return line + f" | peak stash {result.peak_stash}"


def _sq_norm(g: Any) -> float:
    """Sum of squares in float64 by NumPy's pairwise summation: the same on every rank count
    (a threaded BLAS dot would split the sum by thread count)."""
    g64 = g.astype(np.float64, copy=False)
    return float((g64 * g64).sum())


def describe(job: Job) -> str:
    """The layout rank 0 prints at start: stages, their layers, schedule and its peak stash."""
    cfg, plan = job.cfg, job.plan
    bounds = uniform([s.body for s in job.model.layers], plan.n_stages, len(plan.stages[0]))
    parts = [
        f"{k}:{job.model.layers[r.start].name}..{job.model.layers[r.stop - 1].name}"
        if len(r) > 1
        else f"{k}:{job.model.layers[r.start].name}"
        for k, r in enumerate(bounds)
    ]
    meta = job.model.meta
    what = (
        f"{meta['kind']} {meta['n_layer']}x{meta['d_model']}"
        if "kind" in meta
        else f"custom model of {len(job.model.layers)} layers"
    )
    return (
        f"mpipipe: {what} ({cfg.dtype}), pp={plan.pp}, "
        f"schedule {plan.name}, {cfg.microbatches} micro-batches of {cfg.micro_batch}, "
        f"peak stash {job.report.peak_stash}, simulated bubble {job.report.bubble:.2f} "
        f"({'emulated costs ' + str(cfg.emulate) if job.emulation else 'if F = B = W'})\n"
        f"stages: {' | '.join(parts)}"
    )


def _fault_from_env() -> tuple[int, int] | None:
    """MPIPIPE_FAULT=RANK:STEP makes that rank raise at that step (tests of failure handling)."""
    spec = os.environ.get("MPIPIPE_FAULT")
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)
