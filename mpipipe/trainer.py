"""The training loop and its Python API: `train(config, model=None, dataset=None, comm=None)`.

One step on one rank: run the checked, lowered plan on my replica's shard (losses on the last
stage, weight gradients accumulated in micro-batch order, each gradient bucket's all-reduce over
the replicas started as soon as its layers are final), wait for the buckets, then ONE small
all-reduce over the whole grid that carries every layer's squared gradient norm, the loss and the
timings, then clip and step the optimizer. Each layer's norm entry is filled by one rank (its
stage's replica 0) and every other rank adds exact zeros, so the norm (summed in layer order) and
thus every update are bitwise the same for every pipeline size.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from mpipipe import checkpoint, optim, schedule
from mpipipe.config import TrainConfig
from mpipipe.devices import placement, transport
from mpipipe.emulate import emulated_stage
from mpipipe.job import Job, agree, describe, finalize, prepare
from mpipipe.metrics import (
    MetricsFile,
    log_line,
    max_rss_mb,
    measure_peak_flops,
    model_flops_per_step,
)
from mpipipe.model import Model
from mpipipe.parallel.data_parallel import GradReducer
from mpipipe.parallel.grid import Grid
from mpipipe.preemption import Preemption
from mpipipe.runtime import Executor, MicroBatches, Stage
from mpipipe.trace import Tracer
from mpipipe.watchdog import Watchdog
from mpipipe.xp import dtype_of, get, to_numpy


@dataclass
class TrainResult:
    """What a run returns on every rank. `params` holds this rank's parameters (host copies)."""

    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    peak_stash: list[int] = field(default_factory=list)  # measured, per rank of my pipeline
    preempted: str | None = None  # the signal that stopped the run early, if any

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"])

    @property
    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.history if "eval_loss" in r]


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
    job = finalize(job, comm)
    grid = Grid.create(comm, job.cfg.pp, job.cfg.rank_order)
    agree(grid.world, lambda: placement(job, grid))  # e.g. more ranks than GPUs on a node
    try:
        return _Run(job, grid, out).loop()
    finally:
        grid.free()


class _Run:
    def __init__(self, job: Job, grid: Grid, out: Any) -> None:
        self.job, self.cfg, self.grid, self.out = job, job.cfg, grid, out
        self.rank = grid.stage_rank  # my rank within my pipeline
        self.xp, self.device = get(job.backend), placement(job, grid)
        self.dtype = dtype_of(self.cfg.dtype)
        plan, b, cfg = job.plan, self.cfg.micro_batch, self.cfg
        self.stage = Stage(
            job.model, plan, self.rank, cfg.seed, self.dtype, self.xp, job.bounds, cfg.recompute
        )
        if job.emulated:
            emulated_stage(self.stage, job.model, job.emulated, b, self.dtype, self.xp)
        self.p2p = transport(job, grid.pp_comm)
        self.reducer = None
        if grid.dp > 1:
            self.reducer = GradReducer(
                self.stage, grid.dp_comm, int(cfg.bucket_mb * 2**20), cfg.overlap == "on"
            )
        self.loss_scale = 1.0 / (plan.microbatches * grid.dp)  # the mean over the global batch
        scale = self.loss_scale
        self.train_exec = Executor(
            schedule.lower(plan), self.rank, self.stage, job.model, self.p2p, b, self.dtype,
            self.xp, scale,
            on_layer_final=self.reducer.layer_ready if self.reducer else None,
            between=self.reducer.poke if self.reducer else None,
        )  # fmt: skip
        self.eval_exec = Executor(
            schedule.lower(schedule.forward_only(plan)), self.rank, self.stage, job.model,
            self.p2p, b, self.dtype, self.xp,
        )  # fmt: skip
        self.opt = optim.make(cfg.optimizer, self.stage.params, cfg)
        self.n_layers = len(job.model.layers)
        self.n_stages = plan.n_stages
        self.first = 0 in self.stage.ids
        self.last = plan.n_stages - 1 in self.stage.ids
        self.fault = _rank_step_from_env("MPIPIPE_FAULT")
        self.stall = _rank_step_from_env("MPIPIPE_STALL")
        self.preemption = Preemption()
        world = grid.world
        if (self.first or self.last) and hasattr(job.dataset, "tokens"):
            _ = job.dataset.tokens  # read the data now: a long first read is not a hang
        self.layout = grid.layout()
        self.watchdog = Watchdog(cfg.timeout_s, world.Get_rank(), world.Abort)
        self.train_exec.watchdog = self.eval_exec.watchdog = self.watchdog
        self.tracer = Tracer(world, cfg.trace, 1, cfg.trace_steps)  # skip step 0: warm-up
        mine = sum(int(p.size) for p in self.stage.params.values()) if grid.replica == 0 else 0
        self.n_params = world.allreduce(mine, op=MPI.SUM)
        peak = cfg.peak_tflops * 1e12 or measure_peak_flops(self.dtype)
        self.peak_flops = world.allreduce(peak, op=MPI.SUM)  # the whole grid's
        self.flops_per_step = model_flops_per_step(job.model.meta, self.n_params, cfg.global_batch)

    @property
    def tty(self) -> bool:
        from mpipipe.metrics import interactive

        return self.grid.world.Get_rank() == 0 and interactive(self.out)

    def say(self, text: str) -> None:
        if self.grid.world.Get_rank() == 0:
            print("\r\033[K" + text if self.tty else text, file=self.out, flush=True)

    def progress(self, rec: dict[str, Any]) -> None:
        """A one-line progress bar, redrawn in place (terminals only; batch logs get lines)."""
        done = rec["step"] / self.cfg.steps
        bar = "#" * int(30 * done)
        print(
            f"\r[{bar:<30}] {rec['step']}/{self.cfg.steps} loss {rec['loss']:.4f} "
            f"{rec['tokens_per_s']:.0f} tok/s",
            end="",
            file=self.out,
            flush=True,
        )

    def micro_batches(self, step: int, split: str) -> MicroBatches:
        """My replica's disjoint slice of the global batch, split into micro-batches."""
        if not (self.first or self.last):
            return MicroBatches(None, None)
        x, y = self.job.dataset.batch(step, split, self.cfg.global_batch)
        m, b = self.cfg.microbatches, self.cfg.micro_batch
        lo = self.grid.replica * m * b

        def split_(a: Any) -> list[Any]:
            return [self.xp.asarray(a[lo + i * b : lo + (i + 1) * b]) for i in range(m)]

        return MicroBatches(split_(x) if self.first else None, split_(y) if self.last else None)

    def reduce(self, per_layer: dict[int, float], extras: list[float]) -> tuple[list, list]:
        """Sum per-layer values and a few scalars over the whole grid in ONE all-reduce. Each
        per-layer entry comes from one rank (replica 0 of its stage), the others add zeros."""
        vec = np.zeros(self.n_layers + len(extras))
        if self.grid.replica == 0:
            for i, v in per_layer.items():
                vec[i] = v
        vec[self.n_layers :] = extras
        self.grid.world.Allreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
        return list(vec[: self.n_layers]), list(vec[self.n_layers :])

    def action_costs(self) -> list[float]:
        """Mean F, B, W seconds per virtual stage in the last run, 3 x n_stages entries; only
        replica 0 fills in its stages, so the sum over the grid is one pipeline's."""
        sums = np.zeros((3, self.n_stages))
        counts = np.zeros((3, self.n_stages))
        if self.grid.replica == 0:
            for t0, t1, a in self.train_exec.spans:
                kind, k = "FBW".index(a.kind), self.stage.ids[a.chunk]
                sums[kind, k] += t1 - t0
                counts[kind, k] += 1
        return list((sums / np.maximum(counts, 1)).ravel())

    def predicted(self, costs: list[float]) -> schedule.Report:
        if self.job.emulation:
            return self.job.report
        per = np.asarray(costs).reshape(3, self.n_stages)
        return schedule.simulate(self.job.plan, schedule.Costs(*(list(row) for row in per)))

    def evaluate(self) -> float:
        total = 0.0
        for i in range(self.cfg.eval_batches):
            losses = self.eval_exec.run(self.micro_batches(i, "eval"))
            _, (loss,) = self.reduce({}, [sum(losses)])
            total += loss / (self.cfg.microbatches * self.grid.dp)
        return total / self.cfg.eval_batches

    def step(self, step: int) -> dict[str, Any]:
        cfg, world, wd = self.cfg, self.grid.world, self.watchdog
        n, me = world.Get_size(), world.Get_rank()
        clock = time.perf_counter
        t0 = clock()
        wd.step = step
        wd.beat("the start of the step")
        if self.fault == (me, step):
            raise RuntimeError(f"fault injected on rank {me} at step {step} (MPIPIPE_FAULT)")
        if self.stall == (me, step):
            time.sleep(10**6)  # MPIPIPE_STALL: a rank that hangs, for the watchdog's tests
        batch = self.micro_batches(step, "train")
        self.stage.zero_grad()
        ex = self.train_exec
        mixed = isinstance(self.opt, optim.MixedPrecision)
        scale = self.opt.scale if mixed else 1.0  # fp16: the dynamic loss scale
        ex.loss_scale = self.loss_scale * scale
        losses = ex.run(batch)
        t_backward = clock()
        if self.reducer is not None:
            wd.beat("the gradient all-reduce")
            wd.waiting("waiting for the gradient all-reduce with the other replicas of my stage")
            self.reducer.finish(self.p2p.wait)
        t_reduced = clock()
        exposed = t_reduced - t_backward  # all-reduce time not hidden by backward
        sq = {
            i: math.fsum(_sq_norm(self.stage.grads[n]) for n in names)
            for i, names in self.stage.layer_params.items()
        }
        slots = np.zeros((6, n))  # one slot per rank, so the sum is a gather
        stash_mb = ex.peak_stash_bytes / 2**20
        slots[:, me] = ex.busy, ex.wall, exposed, self.preemption.signum, max_rss_mb(), stash_mb
        extras = [sum(losses), *slots.ravel(), *self.action_costs()]
        wd.beat("the step's all-reduce")
        wd.waiting("waiting in the step's all-reduce (norms, loss, timings) for other ranks")
        t_sum = clock()
        per_layer, (loss_sum, *rest) = self.reduce(sq, extras)
        t_summed = clock()
        busy, wall, hid, sig, rss, stash = np.reshape(rest[: 6 * n], (6, n))
        costs = rest[6 * n :]
        signums = [int(x) for x in sig if x]
        if signums and not self.preemption.name:  # another rank was signalled
            self.preemption.name = signal.Signals(signums[0]).name
        span = max(wall)  # the pipeline's step: the slowest rank's run
        norm = math.sqrt(math.fsum(per_layer)) / scale
        factor = optim.clip_factor(norm, cfg.clip)
        lr = optim.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        wd.beat("the optimizer step")
        if mixed:  # fp32 masters; an overflowed step is skipped and the scale halved
            if math.isfinite(norm):
                self.opt.step(self.stage.grads, lr, factor)
            self.opt.update_scale(math.isfinite(norm))
        else:
            if factor < 1.0:
                for g in self.stage.grads.values():
                    g *= factor
            self.opt.step(self.stage.grads, lr)
        t_end = clock()
        if self.tracer.wants(step):
            self.trace_step(step, t_backward, t_reduced, t_sum, t_summed, t_end)
        dt = t_end - t0
        tokens = cfg.global_batch * self.job.model.meta.get("seq_len", 1)  # predictions
        per_stage, stash_per_stage = [0.0] * self.grid.pp, [0.0] * self.grid.pp
        for rank, stage, _, _ in self.layout:
            per_stage[stage] = max(per_stage[stage], rss[rank])
            stash_per_stage[stage] = max(stash_per_stage[stage], stash[rank])
        rec: dict[str, Any] = {
            "step": step + 1,
            "pp": self.grid.pp,
            "dp": self.grid.dp,
            "loss": loss_sum / (cfg.microbatches * self.grid.dp),
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            "pipeline_time_s": span,
            "bubble": 1.0 - sum(busy) / (n * span) if span > 0 else 0.0,  # mean idle fraction
            "allreduce_exposed_s": max(hid),  # the slowest rank's wait for its buckets
            "mfu": self.flops_per_step / dt / self.peak_flops,
            "max_rss_mb": per_stage,  # peak resident memory, the largest replica per stage
            "stash_mb": stash_per_stage,  # peak bytes held by saved activations, per stage
            "preempt": bool(signums),  # a rank got SIGTERM/SIGUSR1: all stop after this step
        }
        if mixed:
            rec["loss_scale"], rec["skipped_steps"] = scale, self.opt.skipped
        if me == 0:  # only rank 0 reports; the simulation is cheap but not free
            report = self.predicted(costs)
            rec["bubble_predicted"] = report.bubble
            rec["pipeline_time_predicted_s"] = report.step_time
        return rec

    def trace_step(self, step: int, *marks: float) -> None:
        t_backward, t_reduced, t_sum, t_summed, t_end = marks
        tr, ex = self.tracer, self.train_exec
        for b, e, a in ex.spans:
            tr.span(str(a), "compute", b, e, step=step + 1, kind=a.kind, mb=a.mb, chunk=a.chunk)
        for b, e, label in ex.waits:
            tr.span(label, "wait", b, e, step=step + 1)
        if self.reducer is not None:
            tr.span("gradient all-reduce", "comm", t_backward, t_reduced, step=step + 1)
        tr.span("step all-reduce", "comm", t_sum, t_summed, step=step + 1)
        tr.span("optimizer", "compute", t_summed, t_end, step=step + 1)

    def resume(self) -> int:
        """Load the checkpoint --resume names (collectively agreed); return the next step."""
        cfg = self.cfg
        if not cfg.resume:
            return 0
        if cfg.resume == "auto":
            found = checkpoint.latest(str(cfg.checkpoint_dir))
            if found is None:
                self.say(f"--resume auto: no checkpoint in {cfg.checkpoint_dir}, starting fresh")
                return 0
            path = found
        else:
            path = checkpoint.resolve(cfg.resume)
        with self.watchdog.paused("loading a checkpoint"):
            step = agree(
                self.grid.world,
                lambda: checkpoint.load(path, self.stage, self.opt, self.job.model),
            )
        self.say(f"resumed from {path} (step {step})")
        return step

    def save(self, step: int) -> None:
        with self.watchdog.paused("saving a checkpoint"):
            self._save(step)

    def _save(self, step: int) -> None:
        path = checkpoint.save(
            str(self.cfg.checkpoint_dir), step, self.stage, self.opt, self.job, self.grid,
            self.cfg.keep_last,
        )  # fmt: skip
        self.say(f"saved {path}")

    def loop(self) -> TrainResult:
        cfg = self.cfg
        self.say(describe(self.job, self.layout))
        start = self.resume()
        metrics = MetricsFile(
            cfg.metrics_file if self.grid.world.Get_rank() == 0 else None, append=start > 0
        )
        result = TrainResult(cfg)
        t_start = time.perf_counter()
        saved = start if cfg.resume else -1
        with Preemption() as preemption:
            self.preemption = preemption
            try:
                for step in range(start, cfg.steps):
                    rec = self.step(step)
                    last = step + 1 == cfg.steps or rec["preempt"]
                    if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                        rec["eval_loss"] = self.evaluate()
                    result.history.append(rec)
                    metrics.write(rec)
                    if (step + 1) % cfg.log_every == 0 or step == start or last:
                        self.say(log_line(rec, cfg.steps))
                    elif self.tty:
                        self.progress(rec)
                    periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
                    if cfg.checkpoint_dir and (periodic or last):
                        self.save(step + 1)
                        saved = step + 1
                    if rec["preempt"]:
                        result.preempted = preemption.name
                        where = (
                            f"checkpoint at step {saved}"
                            if cfg.checkpoint_dir
                            else ("nothing saved: no --checkpoint-dir")
                        )
                        self.say(
                            f"stopped by {preemption.name} after step {step + 1}: {where}"
                            "; start again with --resume auto to continue"
                        )
                        break
            finally:
                metrics.close()
                self.watchdog.close()
                if self.reducer is not None:
                    self.reducer.close()
        self.tracer.write(f"stage {self.grid.stage_rank}, replica {self.grid.replica}")
        if cfg.trace:
            self.say(f"wrote {cfg.trace} (open it in https://ui.perfetto.dev)")
        result.peak_stash = self.grid.pp_comm.allgather(self.train_exec.peak_stash)
        if result.history:
            self.say(summary_line(result, time.perf_counter() - t_start))
        else:
            self.say(f"nothing to do: the checkpoint is at step {start}, --steps is {cfg.steps}")
        result.params = {k: to_numpy(v).copy() for k, v in self.stage.params.items()}
        return result


def summary_line(result: TrainResult, wall: float) -> str:
    h = result.history
    later = h[1:] or h  # the first step includes one-time costs
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in h)
    line = (
        f"done: {len(h)} steps (to step {h[-1]['step']}) in {wall:.1f} s | "
        f"final loss {h[-1]['loss']:.4f} | "
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


def _rank_step_from_env(name: str) -> tuple[int, int] | None:
    """Test hooks: MPIPIPE_FAULT=RANK:STEP makes that world rank raise at that step,
    MPIPIPE_STALL=RANK:STEP makes it hang there (for the watchdog)."""
    spec = os.environ.get(name)
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)
