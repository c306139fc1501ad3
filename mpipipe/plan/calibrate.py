"""`plan --calibrate`: measure this machine by micro-benchmarks and describe it as a machine file.

    matmul     float32 and float64 products: the peak at a large shape, the achieved fraction at
               the mid-size shapes of small models
    copy       memory bandwidth of a large array copy (read + write)
    p2p        ping-pong between 2 ranks under mpiexec (bench.py): latency = the 8-byte one-way
               time, bandwidth from the 4 MiB one
    busy       the same 2 ranks computing 0.25-16 ms of matrix products between all-reduces
               of 128 KiB (tensor parallelism's pattern): the time lost per collective beyond
               the compute, less the links' all-reduce, fitted as a fixed time per collective
               plus a wait that grows as the square root of the compute in between (busy_fit)
    runtime    two 1-rank emulated trainings with 1 ms actions (4 and 16 micro-batches): the
               executor's fixed time per action and per step, from the difference
    by ranks   emulated trainings of N = 2, 4, ... 32 ranks, 1 ms actions, three kinds:
               pipelines (pp = N 1F1B, one layer per stage, 8 micro-batches): the time per
               action that makes the planner's simulation of the run's pipeline last what it
               measured (everything a rank pays between actions with N ranks here: message
               wake-ups, MPI progress and, past the core count, waiting for a core), and the
               time per step outside the pipeline (the step's all-reduce of statistics over N
               ranks, the optimizer's Python);
               wide pipelines (N >= 4: pp = 2 x dp = N/2, 8 micro-batches of one sample): the
               same time per action with most ranks busy at once (the pp = N runs have few;
               where ranks share cores a rank waits longer for one the more want one: 32 ranks
               here took 1.2-1.5 ms per action with 9 busy, 3.0-4.0 ms with 29.5);
               busy replicas (pp = 1, dp = N, one layer, 4 and 16 micro-batches: every rank
               busy at once): the gradient phase beyond the alpha-beta all-reduce, as a time
               per step (the all-reduce's rounds, ranks waiting for a core) and a drift per
               square root of a rank's actions (replicas waiting for the slowest).
               These runs share no layout with --validate's (see the README).
Every rank is one core with one BLAS thread (validate runs them so). One node: both link levels
get the p2p figures; `devices_per_node` is the core count.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mpipipe import launch
from mpipipe.errors import ConfigError
from mpipipe.plan.machine import Link, Machine


def _best(work: object, repeats: int = 10) -> float:
    assert callable(work)
    work()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(dtype: str, n: int, k: int, m: int) -> float:
    a = np.ones((n, k), dtype=dtype)
    b = np.ones((k, m), dtype=dtype)
    return 2.0 * n * k * m / _best(lambda: a @ b)


def copy_bandwidth(nbytes: int = 64 << 20) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2.0 * nbytes / _best(lambda: np.copyto(dst, src))


def _run(cmd: list[str], timeout: float = 300.0) -> str:
    env = {**launch.environment(), "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise ConfigError(f"calibrate: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def p2p(launcher: list[str]) -> dict[str, Any]:
    out = _run([*launcher, sys.executable, "-m", "mpipipe.plan.bench"])
    return dict(json.loads(out.strip().splitlines()[-1]))


SLEEP_MS = 1.0  # each calibration action sleeps this long (2 layers x 1 sample x 0.5 ms)


def runtime_overheads(launcher: list[str]) -> tuple[float, float]:
    """(seconds per action beyond its own time, seconds per step) of the 1-rank executor, from
    two emulated trainings whose actions each sleep SLEEP_MS (a sleeping action pays the wake-up
    as well as the dispatch: what an emulated or GPU-waiting rank pays), 4 and 16 micro-batches
    of one sample."""
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (4, 16):
            metrics = Path(tmp) / f"m{m}.jsonl"
            _run([*launcher, sys.executable, "-m", "mpipipe", "train", "--layers", "2",
                  "--d-model", "32", "--heads", "2", "--seq-len", "16", "--global-batch",
                  str(m), "--microbatches", str(m), "--emulate", "F=0.5,B=0.5,W=0.5",
                  "--steps", "12", "--eval-batches", "1", "--log-every", "1000000",
                  "--metrics-file", str(metrics)])  # fmt: skip
            recs = [json.loads(x) for x in metrics.read_text().splitlines()][1:]
            times[m] = float(np.median([r["step_time_s"] for r in recs]))
    per_action = max(0.0, (times[16] - times[4]) / (3 * 12) - SLEEP_MS / 1e3)
    return per_action, max(0.0, times[4] - 3 * 4 * (per_action + SLEEP_MS / 1e3))


BY_RANKS = (2, 4, 8, 16, 32)
EMULATE = ["--emulate", f"F={SLEEP_MS:g},B={SLEEP_MS:g},W={SLEEP_MS:g}"]  # per layer and sample


def _medians(launcher: list[str], flags: list[str]) -> dict[str, float]:
    """Median step, pipeline and exposed-reduction seconds of an 8-step emulated training."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        _run([*launcher, sys.executable, "-m", "mpipipe", "train", *flags, "--steps", "8",
              "--eval-batches", "1", "--log-every", "1000000",
              "--metrics-file", str(metrics)])  # fmt: skip
        recs = [json.loads(x) for x in metrics.read_text().splitlines()][1:]
        keys = ("step_time_s", "pipeline_time_s", "allreduce_exposed_s")
        return {k: float(np.median([r[k] for r in recs])) for k in keys}


def pipeline_run(n: int) -> tuple[Any, Any, list[str]]:
    """(model, layout, train flags) of the N-rank pipeline calibration run: pp = N 1F1B, one
    layer per stage, 8 micro-batches of one sample, SLEEP_MS per F, B and W."""
    from mpipipe.plan.cost import GPT, Layout

    model = GPT(n, 32, 2, 16, 256, 8, emulate=(SLEEP_MS, SLEEP_MS, SLEEP_MS))
    flags = ["--layers", str(n), "--d-model", "32", "--heads", "2", "--seq-len", "16",
             "--global-batch", "8", "--microbatches", "8", "--pp", str(n), "--schedule", "1f1b",
             *EMULATE]  # fmt: skip
    return model, Layout(n, 1, 1, "1f1b", 1, 8), flags


def busy_run(n: int, m: int) -> tuple[Any, Any, list[str]]:
    """(model, layout, train flags) of an N-rank data-parallel calibration run: pp = 1, dp = N
    (every rank busy, no bubble), one layer, m micro-batches of one sample per replica."""
    from mpipipe.plan.cost import GPT, Layout

    model = GPT(1, 32, 2, 16, 256, m * n, emulate=(SLEEP_MS, SLEEP_MS, SLEEP_MS))
    flags = ["--layers", "1", "--d-model", "32", "--heads", "2", "--seq-len", "16",
             "--global-batch", str(m * n), "--microbatches", str(m), "--pp", "1", "--dp", str(n),
             *EMULATE]  # fmt: skip
    return model, Layout(1, n, 1, "1f1b", 1, m), flags


def wide_run(n: int) -> tuple[Any, Any, list[str]]:
    """(model, layout, train flags) of the N-rank wide calibration run (N >= 4): pp = 2 x
    dp = N / 2 1F1B, one layer per stage, 8 micro-batches of one sample per replica, SLEEP_MS
    per F, B and W: most ranks busy at once, where the pp = N run has few."""
    from mpipipe.plan.cost import GPT, Layout

    d = n // 2
    model = GPT(2, 32, 2, 16, 256, 8 * d, emulate=(SLEEP_MS, SLEEP_MS, SLEEP_MS))
    flags = ["--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "16",
             "--global-batch", str(8 * d), "--microbatches", "8", "--pp", "2", "--dp", str(d),
             "--schedule", "1f1b", *EMULATE]  # fmt: skip
    return model, Layout(2, d, 1, "1f1b", 1, 8), flags


BUSY_M = (4, 16)  # micro-batches of the two busy runs per N: 12 and 48 actions per rank


def overhead_for(pipeline: float, model: Any, layout: Any, machine: Machine) -> float:
    """Microseconds per action that make the planner's simulated pipeline of a calibration run
    (`model`, `layout`) last `pipeline` seconds, the run's measured pipeline time (bisection:
    the simulation grows with the overhead)."""
    from mpipipe.plan.predict import predict

    lo, hi = 0.0, 0.1
    for _ in range(40):
        mid = (lo + hi) / 2
        at = machine.with_action_overhead(mid * 1e6)
        simulated = predict(model, layout, at).breakdown["pipeline"]
        lo, hi = (mid, hi) if simulated < pipeline else (lo, mid)
    return lo * 1e6


def overheads_by_ranks(launch_n: Any, machine: Machine) -> Machine:
    """`machine` with its by-ranks tables measured here, for N in BY_RANKS: the time per action
    by busy ranks (action_overhead_by_busy) from the pp = N run, few ranks busy at once, and
    from N >= 4 the wide run, most busy (each run's pipeline, as overhead_for fits it); the time
    per step outside the pipeline from the pp = N run (its step less its pipeline and the
    predicted optimizer); then from two dp = N runs (BUSY_M micro-batches) the gradient phase:
    each run's step less the prediction of everything else (the alpha-beta all-reduce among
    them), split into the all-reduce's rounds and the replicas' drift by how it grows with the
    actions per rank (phase_fit). No run is a --validate layout."""
    from mpipipe.plan.predict import busy_ranks, predict

    def timed(n: int, run: tuple[Any, Any, list[str]]) -> tuple[tuple[int, float, float], Any]:
        """The (N, busy ranks, us per action) row of one calibration run, and its medians."""
        model, layout, flags = run
        got = _medians(launch_n(n), flags)
        us = overhead_for(got["pipeline_time_s"], model, layout, machine)
        return (n, busy_ranks(model, layout, machine), us), got

    rows = [(1, 1.0, machine.action_overhead_us)]
    step = [(1, machine.step_overhead_ms)]
    reduce: list[tuple[int, float]] = []
    drifts: list[tuple[int, float]] = []
    for n in BY_RANKS:
        model, layout, flags = pipeline_run(n)
        row, got = timed(n, (model, layout, flags))
        rows.append(row)
        at = replace(machine, action_overhead_by_busy=tuple(rows))
        optimizer = predict(model, layout, at).breakdown["optimizer"]
        rest = got["step_time_s"] - got["pipeline_time_s"] - optimizer
        step.append((n, max(0.0, rest) * 1e3))
        if n >= 4:
            rows.append(timed(n, wide_run(n))[0])
    machine = replace(machine, action_overhead_by_busy=tuple(rows),
                      step_overhead_by_ranks=tuple(step))  # fmt: skip
    for n in BY_RANKS:
        extra = []  # ms the gradient phase adds at k = 3 m actions per rank
        for m in BUSY_M:
            model, layout, flags = busy_run(n, m)
            measured = _medians(launch_n(n), flags)["step_time_s"]
            extra.append((3 * m, (measured - predict(model, layout, machine).step_time) * 1e3))
        rounds, drift = phase_fit(extra)
        reduce.append((n, rounds))
        drifts.append((n, drift))
    return replace(machine, reduce_overhead_by_ranks=tuple(reduce),
                   reduce_drift_by_ranks=tuple(drifts))  # fmt: skip


def phase_fit(extra: list[tuple[int, float]]) -> tuple[float, float]:
    """(rounds ms, drift ms per sqrt(action)) through the gradient phase's extra time at two
    action counts, extra = rounds + drift sqrt(k), neither below 0."""
    (k0, e0), (k1, e1) = extra
    drift = max(0.0, (e1 - e0) / (math.sqrt(k1) - math.sqrt(k0)))
    rounds = max(0.0, e0 - drift * math.sqrt(k0))
    if rounds == 0.0:  # the line would cross 0: the drift alone through the larger point
        drift = max(0.0, e1 / math.sqrt(k1))
    return rounds, drift


def calibrate(kind: str = "auto") -> Machine:
    from mpipipe.plan.cost import allreduce_time

    launch_n: Any
    if kind == "srun" or (kind == "auto" and os.environ.get("SLURM_JOB_ID")):
        launch_n = lambda n: ["srun", "-n", str(n)]  # noqa: E731
    else:
        launch_n = launch.find().command
    two, one = launch_n(2), launch_n(1)
    with threadpool_limits(1, user_api="blas"):  # one rank per core, as validate runs them
        peak32 = matmul_flops("float32", 1024, 1024, 1024)
        peak64 = matmul_flops("float64", 1024, 1024, 1024)
        mid = matmul_flops("float32", 256, 128, 384)  # a small model's (b T, C) x (C, 3C)
        bandwidth = copy_bandwidth()
    net = p2p(two)
    beta = (net["large_bytes"] - net["small_bytes"]) / max(1e-9, net["large_s"] - net["small_s"])
    link = Link(beta / 1e9, net["small_s"] * 1e6)
    ring = allreduce_time(link, net["busy_bytes"], 2)
    busy_s, jitter_us = busy_fit([(compute, lost - ring) for compute, lost in net["busy"]])
    per_action, per_step = runtime_overheads(one)
    cores = os.cpu_count() or 1
    machine = Machine(
        name="calibrated",
        devices_per_node=cores,
        memory_gib=_memory_gib() / cores,
        memory_bandwidth_gbs=bandwidth / 1e9,
        flops={"float32": peak32 / 1e12, "float64": peak64 / 1e12},
        matmul_efficiency=min(1.0, mid / peak32),
        intra=link,
        inter=link,
        action_overhead_us=per_action * 1e6,
        step_overhead_ms=per_step * 1e3,
        busy_collective_us=busy_s * 1e6,
        busy_jitter_us=jitter_us,
    )
    return overheads_by_ranks(launch_n, machine)


def busy_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed seconds per collective, microseconds of waiting after 1 ms of compute) through
    (seconds of compute between collectives, seconds lost per collective) points by least
    squares, lost = fixed + jitter sqrt(compute / 1 ms), neither below 0 (a negative fixed
    part: the curve through the origin instead; a falling one: the points' mean, no jitter)."""
    xs, ys = [math.sqrt(x / 1e-3) for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    fixed = my - slope * mx
    if fixed < 0:
        fixed, slope = (
            0.0,
            sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs),
        )
    if slope <= 0:
        fixed, slope = max(0.0, my), 0.0
    return fixed, slope * 1e6


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 16.0
