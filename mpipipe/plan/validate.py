"""`plan --validate`: run a set of layouts here and hold the planner's predictions against them.

Each run is a short `train` (the study's command builder and launcher); its step time is the
median over the steps after the first, its stash per stage the executor's measured peak bytes of
saved activations (`stash_mb` in the metrics). Emulated runs (ranks sleep the given times instead
of computing; real messages, reductions and optimizer) reach 16 and 32 ranks on a small machine;
real-compute runs use a small GPT on 1-2 ranks, predicted from its layers' F/B/W timed here
(plan/profiled.py) rather than the roofline, once just before the run and once just after it,
so that on a shared machine whose load drifts the profile sees, on average, the load the run
saw; each real layout, and each emulated one of CROWDED_RANKS or more, runs REAL_REPEATS
times (the median of the runs against the median of their predictions). The layouts of one
group share model, batch and rank count, so "is the measured best the predicted best" has an
answer there. Emulated ranks mostly sleep, but each action still costs its rank Python, MPI
progress and a wake-up, and past the core count the ranks wait for a core: the machine file's
action_overhead_by_busy prices that per rank count and ranks busy at once,
step_overhead_by_ranks the step's work outside the pipeline and reduce_overhead_by_ranks the
gradient phase of dp > 1, all measured by --calibrate on other layouts (pp = N and
pp = 2 x dp = N/2 1F1B runs; pp = 1, dp = N runs of another model and micro-batch count).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from mpipipe import launch
from mpipipe.errors import ConfigError
from mpipipe.flags import parse_train
from mpipipe.plan.cost import GPT, Layout
from mpipipe.plan.machine import Machine, load
from mpipipe.plan.predict import Prediction, predict
from mpipipe.plan.profiled import Profile

RUN = "--steps 6 --eval-batches 1 --log-every 1000000"
EMU = (
    "--layers 16 --d-model 64 --heads 4 --seq-len 32 --global-batch 32 "
    "--emulate F=1,B=1,W=1 --microbatches 8"
)
REAL = "--layers 4 --d-model 128 --heads 4 --seq-len 64 --global-batch 16 --microbatches 4"

# (group, ranks, flags): the 4-rank emulated group asks which layout is best
FULL = [
    ("emulated-4", 4, f"{EMU} --pp 4 --schedule gpipe"),
    ("emulated-4", 4, f"{EMU} --pp 4 --schedule 1f1b"),
    ("emulated-4", 4, f"{EMU} --pp 4 --schedule interleaved --virtual-stages 2"),
    ("emulated-4", 4, f"{EMU} --pp 4 --schedule zb-h1"),
    ("emulated-4", 4, f"{EMU} --pp 4 --schedule zbv"),
    ("emulated-4", 4, f"{EMU} --pp 2 --dp 2 --schedule 1f1b"),
    ("emulated-4", 4, f"{EMU} --pp 1 --dp 4"),
    ("emulated", 8, f"{EMU} --pp 4 --dp 2 --schedule zb-h1"),
    ("emulated", 16, f"{EMU} --pp 8 --dp 2 --schedule 1f1b"),
    ("emulated", 32, f"{EMU} --pp 8 --dp 4 --schedule 1f1b"),
    ("real", 1, f"{REAL}"),
    ("real", 2, f"{REAL} --pp 2 --schedule 1f1b"),
    ("real", 2, f"{REAL} --dp 2"),
    ("real", 2, f"{REAL} --tp 2"),
]
QUICK = [
    ("emulated-2", 2, "--layers 4 --d-model 32 --heads 2 --seq-len 16 --global-batch 16 "
     "--microbatches 4 --emulate F=1,B=1,W=1 --pp 2 --schedule gpipe"),
    ("emulated-2", 2, "--layers 4 --d-model 32 --heads 2 --seq-len 16 --global-batch 16 "
     "--microbatches 4 --emulate F=1,B=1,W=1 --pp 2 --schedule zb-h1"),
]  # fmt: skip


@dataclass
class Result:
    group: str
    ranks: int
    flags: str
    predicted: Prediction
    step_time: float  # measured, seconds
    stash_mb: list[float]  # measured per stage (0 when emulated)

    @property
    def error(self) -> float:
        return self.predicted.step_time / self.step_time - 1

    @property
    def stash_errors(self) -> list[float]:
        pred = [m.stash / 2**20 for m in self.predicted.memory]
        return [p / s - 1 for p, s in zip(pred, self.stash_mb, strict=True) if s > 0]


def prediction(n: int, flags: list[str], machine: Machine, profile: bool = False) -> Prediction:
    """The planner's prediction for the layout `train` runs with these flags on `n` ranks;
    `profile`: real compute from the layers timed here (validate), not the machine's roofline
    (study --predict, which may name another machine's file)."""
    from mpipipe.job import prepare
    from mpipipe.plan.cli import model_of

    cfg = parse_train(flags)[0]
    job = prepare(cfg, n)
    c = job.cfg
    assert c.pp is not None and c.dp is not None
    layout = Layout(
        c.pp, c.dp, c.tp, c.schedule, len(job.plan.stages[0]), c.microbatches, c.recompute
    ).with_(overlap=c.overlap == "on")
    model = model_of(c)
    if profile:  # the layers (real compute) and the optimizer (both) timed here, just before
        model = replace(model, profile=Profile(*_shape(model)))
    return predict(model, layout, machine, bucket_mb=c.bucket_mb)


def _shape(model: GPT) -> tuple[int, int, int, int, str]:
    return (model.d_model, model.heads, model.seq_len, model.vocab, model.dtype)


_PROFILES: dict[tuple[int, int, int, int, str], Profile] = {}


def profiled(model: GPT) -> GPT:
    """`model` with a Profile of its layers (one per shape and dtype, shared by the runs)."""
    key = _shape(model)
    if key not in _PROFILES:
        _PROFILES[key] = Profile(*key)
    return replace(model, profile=_PROFILES[key])


def measure(n: int, flags: list[str], kind: str, tmp: Path) -> tuple[float, list[float]]:
    from mpipipe.study import launcher, train_command

    metrics = tmp / f"run{n}_{abs(hash(tuple(flags)))}.jsonl"
    cmd = train_command(launcher(kind, n), flags, metrics)
    env = {**launch.environment(), "OMP_NUM_THREADS": "1"}  # a rank per core, as calibrated
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode:
        raise ConfigError(f"validate: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}"
                          f"{proc.stderr[-2000:]}")  # fmt: skip
    recs = [json.loads(x) for x in metrics.read_text().splitlines()][1:]
    step = statistics.median(r["step_time_s"] for r in recs)
    stash = [max(r["stash_mb"][k] for r in recs) for k in range(len(recs[0]["stash_mb"]))]
    return step, stash


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    if n < 2:
        return 1.0
    d2 = sum((a - b) ** 2 for a, b in zip(rx, ry, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


# Real-compute runs are short (~1 s) and their profiles shorter (~0.2 s): on this shared
# machine one profile of a layout moved 143-247 ms between the one before and the one after
# its run. Each real layout therefore runs this many times, each between two profiles; its
# prediction is the median of the profiles, its measurement the median of the runs.
REAL_REPEATS = 3
# The emulated runs of 16 and 32 ranks (8 and 16 per core here) repeat as often: the 32-rank
# layout measured 207-308 ms in a dozen runs within an hour, 6 steps each.
CROWDED_RANKS = 16


def run(machine: Machine, quick: bool, kind: str = "auto") -> list[Result]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for group, n, text in QUICK if quick else FULL:
            flags = [*text.split(), *RUN.split()]
            preds, steps, stashes = [], [], []
            repeats = REAL_REPEATS if group == "real" or n >= CROWDED_RANKS else 1
            for _ in range(repeats):
                preds.append(prediction(n, flags, machine, profile=True))
                step, stash = measure(n, flags, kind, Path(tmp))
                preds.append(prediction(n, flags, machine, profile=True))  # profiled afresh
                steps.append(step)
                stashes.append(stash)
            pred = replace(preds[0], step_time=statistics.median(p.step_time for p in preds))
            stash = [max(s) for s in zip(*stashes, strict=True)]
            r = Result(group, n, text, pred, statistics.median(steps), stash)
            spread = ""
            if len(steps) > 1:  # what the machine's drift does to one layout within a minute
                ps, ms = [p.step_time * 1e3 for p in preds], [x * 1e3 for x in steps]
                spread = (f"; profiles {min(ps):.1f}-{max(ps):.1f}, runs "
                          f"{min(ms):.1f}-{max(ms):.1f} ms")  # fmt: skip
            print(f"validate: {n:>2} ranks {pred.layout.label():<40} predicted "
                  f"{pred.step_time * 1e3:8.1f} ms, measured {r.step_time * 1e3:8.1f} ms "
                  f"({r.error:+.1%}){spread}", flush=True)  # fmt: skip
            out.append(r)
    return out


def report(results: list[Result]) -> str:
    lines = [
        "| group | ranks | layout | predicted ms | measured ms | error | stash per stage, "
        "predicted / measured MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stash = "-"
        if any(r.stash_mb):
            stash = " ".join(
                f"{m.stash / 2**20:.1f}/{s:.1f}"
                for m, s in zip(r.predicted.memory, r.stash_mb, strict=True)
            )
        lines.append(
            f"| {r.group} | {r.ranks} | {r.predicted.layout.label()} | "
            f"{r.predicted.step_time * 1e3:.1f} | {r.step_time * 1e3:.1f} | {r.error:+.1%} | "
            f"{stash} |"
        )
    errs = [abs(r.error) for r in results]
    lines.append("")
    lines.append(
        f"step time: median |error| {statistics.median(errs):.1%}, max {max(errs):.1%} over "
        f"{len(results)} layouts; rank correlation (Spearman) of predicted and measured step "
        f"times {spearman([r.predicted.step_time for r in results], [r.step_time for r in results]):.3f}"  # noqa: E501
    )
    mem = [abs(e) for r in results for e in r.stash_errors]
    if mem:
        lines.append(
            f"stash per stage: median |error| {statistics.median(mem):.1%}, max {max(mem):.1%} "
            f"over {len(mem)} stages"
        )
    for group in dict.fromkeys(r.group for r in results):
        rs = [r for r in results if r.group == group]
        if len(rs) < 2 or group == "emulated" or group == "real":
            continue
        pbest = min(rs, key=lambda r: r.predicted.step_time)
        mbest = min(rs, key=lambda r: r.step_time)
        gap = pbest.step_time / mbest.step_time - 1
        verdict = "the same" if pbest is mbest else f"measured {gap:+.1%} slower than the best"
        rho = spearman([r.predicted.step_time for r in rs], [r.step_time for r in rs])
        lines.append(
            f"{group}: predicted best {pbest.predicted.layout.label()} is {verdict} (measured "
            f"best {mbest.predicted.layout.label()}); Spearman {rho:.3f} over {len(rs)}"
        )
    return "\n".join(lines)


def main(machine_spec: str, quick: bool, kind: str, rest: list[str]) -> int:
    if rest:
        raise ConfigError(f"plan --validate takes no model flags (got {' '.join(rest)})")
    if Path(machine_spec).exists() or not machine_spec.endswith(".toml"):
        machine = load(machine_spec)
    else:
        from mpipipe.plan.calibrate import calibrate

        print(f"validate: {machine_spec} does not exist: calibrating this machine first")
        machine = calibrate(kind)
        Path(machine_spec).write_text(machine.to_toml())
    print(report(run(machine, quick, kind)))
    return 0
