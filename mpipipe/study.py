"""Scaling studies: `python -m mpipipe study --ranks 1,2,4,8 --mode strong|weak --out DIR
[train flags...]` launches one training run per rank count (through `srun` inside a SLURM
allocation, else `mpiexec`), collects each run's metrics and writes DIR/results.csv,
DIR/results.md and, with matplotlib, DIR/throughput.png and DIR/efficiency.png; with
--predict MACHINE (a machine file or preset, see `plan`) the planner's prediction for each run
goes into the table and the plots beside the measurement.

Strong scaling keeps the global batch; weak scaling grows it with the ranks (global batch x
ranks / first rank count). Speed-up is throughput over the first run's; parallel efficiency is
speed-up over the ideal (ranks / first rank count). Layouts follow train's default rule unless
--pp / --dp are passed through. With --emulate the study measures the runtime and schedules on
any machine (a study of 32 ranks runs on a laptop); say so when you publish its numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from mpipipe import launch
from mpipipe.errors import ConfigError
from mpipipe.flags import parse_train

COLUMNS = [
    "ranks",
    "pp",
    "dp",
    "schedule",
    "microbatches",
    "global_batch",
    "tokens_per_s",
    "step_time_s",
    "speedup",
    "efficiency",
    "bubble",
    "emulated",
    "predicted_tokens_per_s",  # with --predict: the planner's figure for the same run
]


def train_command(launch: list[str], flags: list[str], metrics: Path) -> list[str]:
    """`launch python -m mpipipe train FLAGS --metrics-file METRICS`."""
    return [
        *launch,
        sys.executable,
        "-m",
        "mpipipe",
        "train",
        *flags,
        "--metrics-file",
        str(metrics),
    ]


def launcher(kind: str, n: int) -> list[str]:
    if kind == "srun" or (kind == "auto" and os.environ.get("SLURM_JOB_ID")):
        return ["srun", "-n", str(n)]
    try:
        return launch.find().command(n)
    except ConfigError as e:
        raise ConfigError(f"study: {e} (or run inside a SLURM allocation)") from None


def _with(flags: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f == name:
            skip = True
            continue
        if not f.startswith(name + "="):
            out.append(f)
    return [*out, name, value]


def runs(ranks: list[int], mode: str, flags: list[str]) -> list[tuple[int, list[str]]]:
    """(ranks, train flags) for every run of the study; weak scaling grows the global batch of
    the parsed config (flags and --config alike) with the ranks."""
    base = parse_train(flags)[0].global_batch
    plan = []
    for n in ranks:
        run_flags = list(flags)
        if mode == "weak":
            run_flags = _with(run_flags, "--global-batch", str(base * n // ranks[0]))
        plan.append((n, run_flags))
    return plan


def check_run(n: int, flags: list[str]) -> str:
    """Validate one run's train flags for `n` ranks as train would (no launch, no MPI)."""
    from mpipipe.job import prepare

    job = prepare(parse_train(flags)[0], n)
    return f"{n} ranks -> pp={job.cfg.pp} x dp={job.cfg.dp}, schedule {job.plan.name}"


def run_study(
    ranks: list[int],
    mode: str,
    out: Path,
    flags: list[str],
    kind: str = "auto",
    timeout: float = 3600.0,
    predict: str | None = None,
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n, run_flags in runs(ranks, mode, flags):
        metrics, log = out / f"run_{n:04d}.jsonl", out / f"run_{n:04d}.log"
        cmd = train_command(launcher(kind, n), [*run_flags, "--log-every", "1000000"], metrics)
        print(f"study: {' '.join(cmd)}", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=launch.environment()
            )
        if rc:
            tail = log.read_text()[-2000:]
            raise ConfigError(f"study: the run on {n} ranks failed (exit {rc}); see {log}\n{tail}")
        rows.append(summarize(n, run_flags, metrics))
        if predict:
            rows[-1]["predicted_tokens_per_s"] = predicted(n, run_flags, predict)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["efficiency"] = row["speedup"] / (row["ranks"] / rows[0]["ranks"])
    write(rows, out, mode)
    return rows


def predicted(n: int, flags: list[str], machine: str) -> float:
    """The planner's tokens/s for this run (plan/validate.py's prediction of a train command)."""
    from mpipipe.plan.machine import load
    from mpipipe.plan.validate import prediction

    return prediction(n, flags, load(machine)).tokens_per_s


def summarize(n: int, flags: list[str], metrics: Path) -> dict[str, Any]:
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    later = recs[1:] or recs  # the first step carries one-time costs
    cfg = parse_train(flags)[0]
    return {
        "ranks": n,
        "pp": later[-1]["pp"],
        "dp": later[-1]["dp"],
        "schedule": cfg.schedule,
        "microbatches": cfg.microbatches,
        "global_batch": cfg.global_batch,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
        "step_time_s": statistics.median(r["step_time_s"] for r in later),
        "bubble": statistics.median(r["bubble"] for r in later),
        "emulated": cfg.emulate or "",
    }


def write(rows: list[dict[str, Any]], out: Path, mode: str) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(markdown(rows, mode))
    try:
        plot(rows, out, mode)
    except ImportError:
        print("study: matplotlib is not installed, no plots (pip install 'mpipipe[plot]')")


def markdown(rows: list[dict[str, Any]], mode: str) -> str:
    emulated = rows[0]["emulated"]
    head = (
        f"{mode} scaling"
        + (f", EMULATED compute ({emulated} ms per layer and sample)" if emulated else "")
        + "\n\n"
    )
    pred = "predicted_tokens_per_s" in rows[0]
    lines = [
        "| ranks | pp | dp | schedule | micro-batches | global batch | tokens/s | "
        "speed-up | efficiency | bubble |" + (" predicted tokens/s |" if pred else ""),
        "|" + "---|" * (11 if pred else 10),
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['pp']} | {r['dp']} | {r['schedule']} | "
            f"{r['microbatches']} | {r['global_batch']} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f} | {r['efficiency']:.2f} | {r['bubble']:.3f} |"
            + (f" {r['predicted_tokens_per_s']:.0f} |" if pred else "")
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["ranks"] for r in rows]
    tput = [r["tokens_per_s"] for r in rows]
    ideal = [tput[0] * k / n[0] for k in n]
    pred = (
        [r["predicted_tokens_per_s"] for r in rows] if "predicted_tokens_per_s" in rows[0] else []
    )
    note = " (emulated compute)" if rows[0]["emulated"] else ""
    pred_eff = [p / pred[0] / (k / n[0]) for p, k in zip(pred, n, strict=True)] if pred else []
    for name, ys, ideal_ys, ylabel, pys in (
        ("throughput", tput, ideal, "tokens/s", pred),
        ("efficiency", [r["efficiency"] for r in rows], [1.0] * len(n), "parallel efficiency",
         pred_eff),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(n, ideal_ys, "--", color="grey", label="ideal")
        ax.plot(n, ys, "o-", label="measured")
        if pys:
            ax.plot(n, pys, "s:", label="predicted (plan)")
        ax.set_xscale("log", base=2)
        if name == "throughput":
            ax.set_yscale("log", base=2)
        ax.set_xticks(n, [str(k) for k in n])
        ax.set_xlabel("ranks")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode} scaling: {ylabel}{note}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mpipipe study",
        description=__doc__.splitlines()[0],
        epilog="Every other flag is passed to each train run.",
    )
    p.add_argument("--ranks", default="1,2,4,8", help="comma-separated rank counts")
    p.add_argument("--mode", choices=("strong", "weak"), default="strong")
    p.add_argument("--out", required=True, help="folder for logs, metrics, CSV, Markdown, PNGs")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="print the runs, launch nothing")
    p.add_argument(
        "--predict",
        metavar="MACHINE",
        help="also draw the planner's prediction for each run (machine TOML file or preset)",
    )
    args, flags = p.parse_known_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
    except ValueError:
        raise ConfigError(f"--ranks {args.ranks}: give rank counts like 1,2,4,8") from None
    if args.dry_run:
        for n, run_flags in runs(ranks, args.mode, flags):
            print(" ".join([*launcher(args.launcher, n), "python -m mpipipe train", *run_flags]))
            print(f"  ok: {check_run(n, run_flags)}")
        return 0
    rows = run_study(
        ranks, args.mode, Path(args.out), flags, args.launcher, args.timeout, args.predict
    )
    print(markdown(rows, args.mode))
    print(f"wrote {args.out}/results.csv, results.md and plots")
    return 0
