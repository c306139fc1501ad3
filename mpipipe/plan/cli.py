"""`python -m mpipipe plan`: the best layouts of N ranks for a model on a machine.

    python -m mpipipe plan --ranks 4096 --machine dgx-h100 --layers 80 --d-model 10240 \\
        --heads 80 --seq-len 2048 --vocab 51200 --global-batch 2048 --dtype bf16
    python -m mpipipe plan --calibrate --machine-out here.toml     # measure this machine
    python -m mpipipe plan --validate [--quick] --machine here.toml  # predicted vs measured
    python -m mpipipe plan --reproduce megatron-sc21             # vs a published table

Model flags are train's (`--model gpt2-small`, `--layers`, `--global-batch`, `--dtype`,
`--emulate` ...); --pp, --dp, --tp, --schedule, --microbatches, when given, pin that choice.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mpipipe.config import TrainConfig
from mpipipe.emulate import Emulation
from mpipipe.errors import ConfigError
from mpipipe.flags import parse_train
from mpipipe.plan.cost import GPT, Layout
from mpipipe.plan.machine import load
from mpipipe.plan.predict import Prediction
from mpipipe.plan.search import Space, reason, search


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpipipe plan",
        description=__doc__,
        epilog="Every other flag is train's (model, batch, dtype, pinned layout choices).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ranks", type=int, default=None, help="ranks (GPUs or processes) to plan for")
    p.add_argument(
        "--machine",
        default=None,
        help="machine TOML file or preset: dgx-h100, selene-a100 (--validate: default "
        "machine.toml, calibrated if missing)",
    )
    p.add_argument("--top", type=int, default=5, help="layouts to print (default: 5)")
    p.add_argument("--explain", action="store_true", help="print each layout's breakdown")
    p.add_argument("--out", help="write PREFIX.csv and PREFIX.json of every fitting layout")
    p.add_argument(
        "--profile",
        action="store_true",
        help="time the model's real layers here (F/B/W per micro-batch size and tp) instead of "
        "the machine file's roofline: for planning on the machine plan runs on",
    )
    p.add_argument("--calibrate", action="store_true", help="measure this machine, write TOML")
    p.add_argument("--machine-out", default="machine.toml", help="--calibrate: where to write")
    p.add_argument("--validate", action="store_true", help="run layouts, compare with predictions")
    p.add_argument("--quick", action="store_true", help="--validate: two layouts only")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto")
    p.add_argument(
        "--reproduce",
        choices=("megatron-sc21",),
        help="predict a published table (Megatron SC21 Table 1 on --machine, default "
        "selene-a100) next to its figures",
    )
    return p


def model_of(cfg: TrainConfig) -> GPT:
    if not cfg.is_gpt:
        raise ConfigError(f"plan models GPTs (--model {cfg.model}: use --model gpt or a preset)")
    emulate = None
    if cfg.emulate:
        e = Emulation.parse(cfg.emulate)
        emulate = (e.f_ms, e.b_ms, e.w_ms)
    return GPT(
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.seq_len,
        cfg.vocab or 256,  # the built-in corpus is bytes
        cfg.global_batch,
        cfg.dtype,
        cfg.optimizer,
        emulate,
    )


def space_of(cfg: TrainConfig, argv: list[str]) -> Space:
    given = {a.split("=")[0] for a in argv}
    return Space(
        pp=cfg.pp,
        dp=cfg.dp,
        tp=cfg.tp if "--tp" in given else None,
        schedules=(cfg.schedule,) if "--schedule" in given else Space.schedules,
        microbatches=cfg.microbatches if "--microbatches" in given else None,
        recompute=(cfg.recompute,) if "--recompute" in given else Space.recompute,
    )


def train_flags(model: GPT, layout: Layout) -> list[str]:
    """The train flags that run `layout` (ZeRO-1 and sequence parallelism as their flags)."""
    flags = [
        "--layers", str(model.layers), "--d-model", str(model.d_model),
        "--heads", str(model.heads), "--seq-len", str(model.seq_len),
        "--vocab", str(model.vocab), "--global-batch", str(model.global_batch),
        "--dtype", model.dtype, "--optimizer", model.optimizer,
        "--pp", str(layout.pp), "--dp", str(layout.dp), "--tp", str(layout.tp),
        "--schedule", layout.schedule, "--microbatches", str(layout.microbatches),
    ]  # fmt: skip
    if layout.v > 1:
        flags += ["--virtual-stages", str(layout.v)]
    if layout.recompute != "none":
        flags += ["--recompute", layout.recompute]
    if layout.zero:
        flags += ["--zero", "1"]
    if layout.sp:
        flags += ["--sequence-parallel"]
    if not layout.overlap:
        flags += ["--overlap", "off"]
    if model.emulate:
        f, b, w = model.emulate
        flags += ["--emulate", f"F={f:g},B={b:g},W={w:g}"]
    return flags


def toml_of(model: GPT, layout: Layout) -> str:
    flags = train_flags(model, layout)
    lines, i = ["[train]"], 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            lines.append(f"{key} = {value if value.isdigit() else json.dumps(value)}")
            i += 2
        else:
            lines.append(f"{key} = true")
            i += 1
    return "\n".join(lines)


def row(p: Prediction) -> dict[str, object]:
    lay = p.layout
    return {
        "pp": lay.pp, "dp": lay.dp, "tp": lay.tp, "schedule": lay.schedule, "v": lay.v,
        "microbatches": lay.microbatches, "recompute": lay.recompute, "zero": lay.zero,
        "sp": int(lay.sp), "step_time_s": p.step_time, "tokens_per_s": p.tokens_per_s,
        "mfu": p.mfu, "bubble": p.bubble, "peak_gib": p.peak_memory / 2**30,
        "stage_gib": [round(m.total / 2**30, 3) for m in p.memory],
    }  # fmt: skip


def main(argv: list[str]) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.calibrate:
        from mpipipe.plan.calibrate import calibrate

        machine = calibrate(args.launcher)
        Path(args.machine_out).write_text(machine.to_toml())
        print(machine.to_toml())
        print(f"wrote {args.machine_out}")
        return 0
    if args.reproduce:
        from mpipipe.plan.megatron import reproduce

        print(reproduce(args.machine or "selene-a100"))
        return 0
    if args.validate:
        from mpipipe.plan.validate import main as validate

        return validate(args.machine or "machine.toml", args.quick, args.launcher, rest)
    if args.ranks is None or args.machine is None:
        raise ConfigError("plan needs --ranks N and --machine FILE|PRESET (e.g. dgx-h100)")
    cfg, _ = parse_train(rest)
    model, machine = model_of(cfg), load(args.machine)
    if args.profile and model.emulate is None:
        from mpipipe.plan.validate import profiled

        model = profiled(model)
    preds, n = search(model, args.ranks, machine, space_of(cfg, rest))
    if not preds:
        raise ConfigError(f"none of {n} layouts fits {machine.memory_gib:g} GiB per device")
    print(
        f"{model.params / 1e9:.2f}B-parameter GPT, global batch {model.global_batch}, on "
        f"{args.ranks} x {machine.name}: {n} layouts considered, {len(preds)} simulated exactly "
        "and fit"
    )
    print(f"{'#':>2}  {'layout':<52} {'step s':>9} {'tokens/s':>11} {'MFU':>6}  why")
    for i, p in enumerate(preds[: args.top]):
        print(
            f"{i + 1:>2}  {p.layout.label():<52} {p.step_time:>9.4f} {p.tokens_per_s:>11.0f} "
            f"{p.mfu:>6.1%}  {reason(p, preds[0], machine.memory_gib)}"
        )
        if args.explain:
            print(p.explain())
    if args.out:
        rows = [row(p) for p in preds]
        with open(f"{args.out}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}.csv and {args.out}.json")
    best = preds[0]
    flags = " ".join(train_flags(model, best.layout))
    print(f"\nrun the best:\n  mpiexec -n {args.ranks} {sys.executable} -m mpipipe train {flags}")
    print(f"  srun -n {args.ranks} python -m mpipipe train {flags}")
    print(f"\nor as a --config file:\n{toml_of(model, best.layout)}")
    return 0
