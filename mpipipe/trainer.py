"""The training loop and its Python API: `train(config, model=None, dataset=None, comm=None)`.

One step on one rank: run the checked, lowered plan on my replica's shard (losses on the last
stage, weight gradients accumulated in micro-batch order, each gradient bucket's all-reduce over
the replicas started as soon as its layers are final), wait for the buckets, then reduce the
step's statistics over the whole grid (stats.py: every layer's squared gradient norm, the loss,
the timings; two messages whose size does not grow with the number of ranks), then clip and
step the optimizer. Each layer's norm entry is filled by one rank (its stage's replica 0) and
every other rank adds exact zeros, so the norm (summed in layer order) and thus every update are
bitwise the same for every pipeline size.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from mpipipe import checkpoint, optim, schedule
from mpipipe.config import TrainConfig
from mpipipe.errors import NonFiniteError
from mpipipe.faults import Faults
from mpipipe.job import agree, describe, finalize, prepare, scan_tokens
from mpipipe.metrics import (
    MetricsFile,
    log_line,
    max_rss_mb,
    measure_peak_flops,
    model_flops_per_step,
)
from mpipipe.model import Model
from mpipipe.parallel.grid import Grid
from mpipipe.parallel.tensor import owned, whole
from mpipipe.preemption import Preemption
from mpipipe.runtime import Runtime, place
from mpipipe.stage import layer_sq_norms as stage_sq_norms
from mpipipe.stats import StepStats
from mpipipe.trace import Tracer
from mpipipe.watchdog import Watchdog
from mpipipe.xp import is_half, to_numpy


@dataclass
class TrainResult:
    """What a run returns on every rank. `params` holds this rank's parameters (host copies)."""

    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    peak_stash: list[int] = field(default_factory=list)  # measured, per rank of my pipeline
    param_bytes: int = 0  # bytes of the parameters this rank holds (its shards with --tp)
    activation_bytes: int = 0  # most bytes one micro-batch's forward saved on this rank
    optimizer_bytes: int = 0  # bytes of this rank's optimizer state (its pieces with --zero 1)
    preempted: str | None = None  # the signal that stopped the run early, if any
    plan: schedule.Plan | None = None  # the schedule that ran (auto: as synthesized at start)

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

    def say(text: str) -> None:
        if comm.Get_rank() == 0:
            print(text, file=out, flush=True)

    # signals are handled from here on, start-up included: the run stops before step 1
    with Preemption(comm.Abort, say) as preemption:
        job = agree(comm, lambda: prepare(cfg, comm.Get_size(), model, dataset))
        grid = Grid.create(comm, job.cfg.pp, job.cfg.rank_order, job.cfg.tp)
        try:
            agree(grid.world, lambda: scan_tokens(job, grid))  # ids outside the vocabulary
            device = agree(grid.world, lambda: place(job, grid))  # e.g. more ranks than GPUs
            job = finalize(job, grid.world, device.xp)  # --partition time: timed on the device
            return _Run(Runtime(job, grid, device), out, preemption).loop()
        finally:
            grid.free()


def spread(comm: MPI.Comm, value: int) -> tuple[int, int]:
    """The least and the largest of `value` over `comm`, in one all-reduce (MAX of -v and v)."""
    both = np.array([-value, value], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    return -int(both[0]), int(both[1])


def layer_sq_norms(rt: Runtime) -> dict[int, float]:
    """Each of my layers' squared gradient norm (stage.layer_sq_norms). With --tp, each rank of
    the group counts its shards and rank 0 the replicated parameters (the grid's SUM adds
    them)."""
    stage, copy = rt.stage, rt.tied_copy  # a tied copy counts on its other rank
    names = [
        n
        for i in sorted(stage.layer_params)
        for n in stage.layer_params[i]
        if owned(n, stage.splits, rt.tp) and n != copy
    ]
    return stage_sq_norms(stage.grads, names)


class _Run:
    def __init__(self, rt: Runtime, out: Any, preemption: Preemption) -> None:
        self.rt, self.job, self.cfg, self.grid, self.out = rt, rt.job, rt.job.cfg, rt.grid, out
        cfg, plan, world = self.cfg, rt.job.plan, rt.grid.world
        zero = rt.zero  # --zero 1: the optimizer steps my pieces of the parameters
        params, decay = (zero.params, zero.decay) if zero else (rt.stage.params, None)
        self.opt = optim.make(cfg.optimizer, params, cfg, decay)
        slots = self.opt.state_dict()[1].values()
        self.opt_bytes = sum(int(a.nbytes) for arrays in slots for a in arrays.values())
        self.opt_bytes_range = spread(world, self.opt_bytes)
        self.n_layers, self.n_stages = len(self.job.model.layers), plan.n_stages
        self.faults = Faults.parse(cfg.inject_fault)
        self.preemption = preemption
        self.layout = self.grid.layout()
        self.watchdog = Watchdog(cfg.timeout_s, world.Get_rank(), world.Abort)
        assert rt.train_exec is not None
        self.train_exec = rt.train_exec
        self.train_exec.watchdog = rt.eval_exec.watchdog = self.watchdog
        self.tracer = Tracer(world, cfg.trace, 1, cfg.trace_steps)  # skip step 0: warm-up
        params, splits = rt.stage.params, rt.stage.splits
        copy = rt.tied_copy  # the head's copy of a tied weight is counted once
        mine = sum(int(p.size) for n, p in params.items() if owned(n, splits, rt.tp) and n != copy)
        self.n_params = world.allreduce(mine if self.grid.replica == 0 else 0, op=MPI.SUM)
        self.param_bytes = sum(int(p.nbytes) for p in params.values())
        self.param_bytes_range = spread(world, self.param_bytes)
        if cfg.peak_tflops:
            peak, self.peak_source = cfg.peak_tflops * 1e12, "--peak-tflops per rank"
        else:
            # NumPy has no BLAS for 16-bit floats: the CPU's matrix peak is its float32 one
            cpu_half = rt.xp is np and is_half(rt.dtype)
            peak, clock = measure_peak_flops(rt.xp, np.float32 if cpu_half else rt.dtype)
            self.peak_source = (
                f"a {'float32 ' * cpu_half}matrix product measured on each rank, timed by {clock}"
            )
        self.peak_flops = world.allreduce(peak, op=MPI.SUM)  # the whole grid's
        self.flops_per_step = model_flops_per_step(
            self.job.model.meta, self.n_params, cfg.global_batch
        )

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

    def batch(self, step: int, split: str) -> Any:
        """My replica's rows of the step's global batch; ranks of middle stages read nothing."""
        if not self.rt.reads_data:
            return self.rt.micro_batches(None, None)
        x, y = self.job.dataset.batch(step, split, self.cfg.global_batch, self.rt.rows)
        return self.rt.micro_batches(x, y)

    def predicted(self, costs: np.ndarray) -> schedule.Report:
        if self.job.emulation:
            return self.job.report
        f, b, w = (list(map(float, row)) for row in costs)
        return schedule.simulate(self.job.plan, schedule.Costs(f, b, w))

    def evaluate(self) -> float:
        total = 0.0
        for i in range(self.cfg.eval_batches):
            losses = self.rt.eval_exec.run(self.batch(i, "eval"))
            mine = sum(losses) if self.grid.tp_rank == 0 else 0.0  # a tp group's losses are equal
            loss = np.array([mine], dtype=np.float64)
            self.rt.transport.allreduce(self.grid.world, loss)
            total += float(loss[0]) / (self.cfg.microbatches * self.grid.dp)
        return total / self.cfg.eval_batches

    def stats(self, losses: list[float], exposed: float) -> StepStats:
        """This rank's figures for the step (before the grid-wide reduction)."""
        ex, me = self.train_exec, self.grid.stage_rank
        st = StepStats(self.n_layers, self.n_stages, self.grid.pp)
        if self.rt.zero is not None:  # every replica its pieces (see parallel/zero.py)
            for i, sq in self.rt.zero.layer_sq_norms(self.rt.tied_copy).items():
                st.layer_sq[i] = sq
        elif self.grid.replica == 0:  # one rank per layer (per shard with --tp) fills these in
            for i, sq in layer_sq_norms(self.rt).items():
                st.layer_sq[i] = sq
        if self.grid.replica == 0 and self.grid.tp_rank == 0:  # and one per stage these
            counts = np.zeros_like(st.costs)
            for t0, t1, a in ex.spans:
                kind, k = "FBW".index(a.kind), self.rt.stage.ids[a.chunk]
                st.costs[kind, k] += t1 - t0
                counts[kind, k] += 1
            st.costs /= np.maximum(counts, 1)
        st.loss_sum = sum(losses) if self.grid.tp_rank == 0 else 0.0  # equal over a tp group
        st.busy = ex.busy
        st.wall, st.exposed, st.signum = ex.wall, exposed, self.preemption.signum
        st.rss_mb[me], st.stash_mb[me] = max_rss_mb(), ex.peak_stash_bytes / 2**20
        return st

    def step(self, step: int) -> dict[str, Any]:
        cfg, wd, rt = self.cfg, self.watchdog, self.rt
        clock = time.perf_counter
        t0 = clock()
        wd.step = step
        wd.beat("the start of the step")
        self.faults.step(self.grid.world.Get_rank(), step)
        batch = self.batch(step, "train")
        rt.stage.zero_grad()
        scale = self.opt.loss_scale  # fp16: the dynamic loss scale; else 1
        self.train_exec.loss_scale = rt.loss_scale * scale
        losses = self.train_exec.run(batch)
        if rt.tie is not None:  # the tied gradient, before the replicas' reduction and clipping
            wd.beat("the tied embedding's gradient sum")
            rt.finish_tie()
        t_backward = clock()
        if rt.reducer is not None:
            wd.beat("the gradient all-reduce")
            wd.waiting("waiting for the gradient all-reduce with the other replicas of my stage")
            rt.reducer.finish()
        t_reduced = clock()
        st = self.stats(losses, exposed=t_reduced - t_backward)
        wd.beat("the step's all-reduce")
        wd.waiting("waiting in the step's all-reduce (norms, loss, timings) for other ranks")
        t_sum = clock()
        st.reduce(rt.transport, self.grid.world)
        t_summed = clock()
        if st.signum and not self.preemption.name:  # another rank was signalled
            self.preemption.name = signal.Signals(st.signum).name
        loss = st.loss_sum / (cfg.microbatches * self.grid.dp)
        norm = math.sqrt(math.fsum(st.layer_sq)) / scale
        lr = optim.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        wd.beat("the optimizer step")
        if math.isfinite(norm) and math.isfinite(loss):
            grads = rt.zero.grads if rt.zero else rt.stage.grads
            self.opt.step(grads, lr, optim.clip_factor(norm, cfg.clip))
            if rt.zero is not None:
                wd.beat("the parameter all-gather")
                rt.zero.gather()
        elif not self.opt.overflowed():  # fp16 skips the step; anything else stops here
            raise NonFiniteError(
                f"step {step + 1}: the loss is {loss} and the gradient norm {norm}: stopped "
                "before the optimizer step, nothing of this step was saved (lower --lr, or "
                "resume from the last checkpoint)"
            )
        t_end = clock()
        if self.tracer.wants(step):
            self.trace_step(step, t_backward, t_reduced, t_sum, t_summed, t_end)
        return self.record(step, st, loss, norm, lr, scale, t_end - t0)

    def record(
        self, step: int, st: StepStats, loss: float, norm: float, lr: float, scale: float,
        dt: float,
    ) -> dict[str, Any]:  # fmt: skip
        """The step's metrics (the JSONL record and the log line's source)."""
        cfg, n = self.cfg, self.grid.world.Get_size()
        tokens = cfg.global_batch * self.job.model.meta.get("seq_len", 1)  # predictions
        rec: dict[str, Any] = {
            "step": step + 1,
            "pp": self.grid.pp,
            "dp": self.grid.dp,
            "tp": self.grid.tp,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            "pipeline_time_s": st.wall,  # the pipeline's step: the slowest rank's run
            "bubble": 1.0 - st.busy / (n * st.wall) if st.wall > 0 else 0.0,  # mean idle
            "allreduce_exposed_s": st.exposed,  # the slowest rank's wait for its buckets
            "mfu": self.flops_per_step / dt / self.peak_flops,
            "max_rss_mb": list(st.rss_mb),  # peak resident memory, the largest replica per stage
            "stash_mb": list(st.stash_mb),  # peak bytes held by saved activations, per stage
            "stats_bytes": st.nbytes,  # this step's bookkeeping message, per rank
            "preempt": bool(st.signum),  # a rank got a signal: all stop after this step
        }
        scalars = self.opt.scalars()  # fp16: the loss scale used and the steps skipped so far
        if scalars:
            rec["loss_scale"], rec["skipped_steps"] = scale, int(scalars["skipped"])
        if self.grid.world.Get_rank() == 0:  # only rank 0 reports; the simulation is not free
            report = self.predicted(st.costs)
            rec["bubble_predicted"] = report.bubble
            rec["pipeline_time_predicted_s"] = report.step_time
        return rec

    def opt_line(self) -> str:
        """Optimizer bytes per rank, and whether --zero 1 shards them."""
        low, high = self.opt_bytes_range
        note = ""
        if self.cfg.zero:
            dp = self.grid.dp
            note = f" (--zero 1: 1/{dp} each)" if dp > 1 else " (--zero 1 with dp 1: no-op)"
        return f"optimizer bytes per rank: {low:,} to {high:,}{note}"

    def trace_step(self, step: int, *marks: float) -> None:
        t_backward, t_reduced, t_sum, t_summed, t_end = marks
        tr, ex = self.tracer, self.train_exec
        for (b, e, a), lane in zip(ex.spans, ex.lanes, strict=True):
            tr.span(
                str(a), "compute", b, e, lane, step=step + 1, kind=a.kind, mb=a.mb, chunk=a.chunk
            )
        for b, e, label in ex.waits:
            tr.span(label, "wait", b, e, step=step + 1)
        if self.rt.reducer is not None:
            tr.span("gradient all-reduce", "comm", t_backward, t_reduced, step=step + 1)
        tr.span("step all-reduce", "comm", t_sum, t_summed, step=step + 1)
        tr.span("optimizer", "compute", t_summed, t_end, step=step + 1)

    def resume(self) -> int:
        """Check the checkpoint directory (writable on every rank that saves, leftovers of
        killed saves removed), then load the checkpoint --resume names; return the next step."""
        cfg, world = self.cfg, self.grid.world
        if cfg.checkpoint_dir:
            writer = self.grid.replica == 0  # replica 0 of each stage writes its shard
            me, root = world.Get_rank(), cfg.checkpoint_dir
            for note in agree(world, lambda: checkpoint.prepare_dir(root, me, writer)):
                self.say(note)
        if not cfg.resume:
            return 0
        auto = cfg.resume == "auto"
        with self.watchdog.paused("loading a checkpoint"):
            path, step, notes = checkpoint.restore(
                world, str(cfg.checkpoint_dir) if auto else cfg.resume, self.rt.stage, self.opt,
                self.job.model, fresh_ok=auto,
                cuts=self.rt.zero.cuts if self.rt.zero else None,
                aliases=self.rt.aliases,
            )  # fmt: skip
        for note in notes:
            self.say(f"--resume {cfg.resume}: {note}")
        if path is None:
            self.say(f"--resume auto: no checkpoint in {cfg.checkpoint_dir}, starting fresh")
        else:
            self.say(f"resumed from {path} (step {step})")
        return step

    def save(self, step: int) -> None:
        with self.watchdog.paused("saving a checkpoint"):
            self._save(step)

    def _save(self, step: int) -> None:
        """A failed save raises SaveError on every rank (one line, exit 2): the work since the
        previous checkpoint is lost, that checkpoint is not."""
        path = checkpoint.save(
            str(self.cfg.checkpoint_dir), step, self.rt.stage, self.opt, self.job, self.grid,
            self.cfg.keep_last, self.faults, self.rt.zero, self.rt.tied_copy,
        )  # fmt: skip
        self.say(f"saved {path}")

    def loop(self) -> TrainResult:
        cfg, world = self.cfg, self.grid.world
        self.say(describe(self.job, self.layout))
        low, high = self.param_bytes_range
        self.say(
            f"parameter bytes per rank: {low:,} to {high:,} ({self.n_params:,} parameters in "
            f"all{f', split over tp={self.grid.tp}' if self.grid.tp > 1 else ''})"
        )
        self.say(f"MFU of {self.peak_flops / 1e12:.3g} TFLOP/s in all ({self.peak_source})")
        self.say(self.opt_line())
        result = TrainResult(cfg, param_bytes=self.param_bytes, optimizer_bytes=self.opt_bytes)
        result.plan = self.job.plan
        preemption = self.preemption  # installed by train() before any start-up work
        start = self.resume()
        metrics = MetricsFile(
            cfg.metrics_file if world.Get_rank() == 0 else None, append=start > 0
        )
        t_start = time.perf_counter()
        saved = start if cfg.resume else -1
        end = cfg.steps
        if signum := world.allreduce(preemption.signum, op=MPI.MAX):
            result.preempted, end = signal.Signals(signum).name, start
            where = f"the checkpoint at step {start} is unchanged" if start else "none saved"
            self.say(
                f"stopped by {result.preempted} before step {start + 1}: nothing trained, "
                f"{where}; start again with --resume auto to continue"
            )
        try:
            for step in range(start, end):
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
            self.rt.close()
        self.tracer.write(f"stage {self.grid.stage_rank}, replica {self.grid.replica}")
        if cfg.trace:
            self.say(f"wrote {cfg.trace} (open it in https://ui.perfetto.dev)")
        result.peak_stash = self.grid.pp_comm.allgather(self.train_exec.peak_stash)
        result.activation_bytes = act = self.train_exec.peak_ctx_bytes
        low, high = spread(world, act)
        self.say(
            f"saved activations per micro-batch per rank (measured): {low:,} to {high:,} bytes"
        )
        if result.history:
            self.say(summary_line(result, time.perf_counter() - t_start))
        elif not result.preempted:
            self.say(f"nothing to do: the checkpoint is at step {start}, --steps is {cfg.steps}")
        copy = self.rt.tied_copy  # stored once: under the embedding's name
        mine = {k: to_numpy(v).copy() for k, v in self.rt.stage.params.items() if k != copy}
        result.params = whole(mine, self.rt.stage.splits, self.rt.tp, self.grid.tp_comm)
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
