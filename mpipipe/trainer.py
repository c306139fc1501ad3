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
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI

from mpipipe import optim, schedule
from mpipipe.config import TrainConfig
from mpipipe.data import ByteDataset, resolve
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


def prepare(
    cfg: TrainConfig, world_size: int, model: Model | None = None, dataset: Any = None
) -> Job:
    """All validation, cheap and identical on every rank; raises ConfigError with the fix."""
    cfg = cfg.validate(world_size)
    model = model or build_model(cfg)
    assert cfg.pp is not None
    uniform([s.body for s in model.layers], cfg.pp)  # raises when stages outnumber layers
    cfg.check_launch(world_size)
    plan = schedule.build(cfg.schedule, cfg.pp, cfg.microbatches)
    report = schedule.check(plan)
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
    return Job(cfg, model, plan, report, dataset)


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
        plan = job.plan
        self.stage = Stage(job.model, plan, self.rank, self.cfg.seed, self.dtype, self.xp)
        p2p = P2P(grid.pp_comm)
        b = self.cfg.micro_batch
        self.train_exec = Executor(
            schedule.lower(plan), self.rank, self.stage, job.model, p2p, b, self.dtype, self.xp
        )
        eval_plan = schedule.forward_only(plan.pp, plan.microbatches)
        self.eval_exec = Executor(
            schedule.lower(eval_plan),
            self.rank,
            self.stage,
            job.model,
            p2p,
            b,
            self.dtype,
            self.xp,
        )
        self.opt = optim.make(self.cfg.optimizer, self.stage.params, self.cfg)
        self.n_layers = len(job.model.layers)
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

    def reduce(self, per_layer: dict[int, float], loss: float) -> tuple[list[float], float]:
        """Sum per-layer values and the loss over the pipeline: one exact all-reduce."""
        vec = np.zeros(self.n_layers + 1)
        for i, v in per_layer.items():
            vec[i] = v
        vec[-1] = loss
        self.grid.pp_comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
        return list(vec[:-1]), float(vec[-1])

    def evaluate(self) -> float:
        total = 0.0
        for i in range(self.cfg.eval_batches):
            losses = self.eval_exec.run(self.micro_batches(i, "eval"))
            _, loss = self.reduce({}, sum(losses))
            total += loss / self.cfg.microbatches
        return total / self.cfg.eval_batches

    def loop(self) -> TrainResult:
        cfg, job = self.cfg, self.job
        self.say(describe(job))
        metrics = MetricsFile(cfg.metrics_file if self.rank == 0 else None)
        result = TrainResult(cfg)
        tokens = cfg.global_batch * job.model.meta.get("seq_len", 1)  # predictions per step
        t_start = time.perf_counter()
        try:
            for step in range(cfg.steps):
                t0 = time.perf_counter()
                if self.fault == (self.rank, step):
                    raise RuntimeError(
                        f"fault injected on rank {self.rank} at step {step} (MPIPIPE_FAULT)"
                    )
                batch = self.micro_batches(step, "train")
                self.stage.zero_grad()
                losses = self.train_exec.run(batch)
                sq = {
                    i: math.fsum(_sq_norm(self.stage.grads[n]) for n in names)
                    for i, names in self.stage.layer_params.items()
                }
                per_layer, loss_sum = self.reduce(sq, sum(losses))
                norm = math.sqrt(math.fsum(per_layer))
                factor = optim.clip_factor(norm, cfg.clip)
                if factor < 1.0:
                    for g in self.stage.grads.values():
                        g *= factor
                lr = optim.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
                self.opt.step(self.stage.grads, lr)
                dt = time.perf_counter() - t0
                rec: dict[str, Any] = {
                    "step": step + 1,
                    "loss": loss_sum / cfg.microbatches,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_s": tokens / dt,
                    "step_time_s": dt,
                }
                if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                    rec["eval_loss"] = self.evaluate()
                result.history.append(rec)
                metrics.write(rec)
                if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps:
                    self.say(log_line(rec, cfg.steps))
        finally:
            metrics.close()
        wall = time.perf_counter() - t_start
        h = result.history
        self.say(
            f"done: {cfg.steps} steps in {wall:.1f} s | final loss {h[-1]['loss']:.4f} | "
            f"eval loss {h[-1]['eval_loss']:.4f} (first eval {result.eval_losses[0]:.4f}) | "
            f"{tokens * cfg.steps / wall:.0f} tok/s overall"
        )
        result.params = {k: to_numpy(v).copy() for k, v in self.stage.params.items()}
        return result


def _sq_norm(g: Any) -> float:
    """Sum of squares in float64 by NumPy's pairwise summation: the same on every rank count
    (a threaded BLAS dot would split the sum by thread count)."""
    g64 = g.astype(np.float64, copy=False)
    return float((g64 * g64).sum())


def describe(job: Job) -> str:
    """The layout rank 0 prints at start: stages, their layers, schedule and its peak stash."""
    cfg, plan = job.cfg, job.plan
    bounds = uniform([s.body for s in job.model.layers], plan.n_stages)
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
        f"peak stash {job.report.peak_stash}, simulated bubble {job.report.bubble:.2f}\n"
        f"stages: {' | '.join(parts)}"
    )


def _fault_from_env() -> tuple[int, int] | None:
    """MPIPIPE_FAULT=RANK:STEP makes that rank raise at that step (tests of failure handling)."""
    spec = os.environ.get("MPIPIPE_FAULT")
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)
