"""The published reproduction: predicted per-GPU TFLOP/s for the rows of the Megatron SC21
weak-scaling table (plan/data/megatron_sc21.csv) on the Selene preset, next to the published
figures. One machine file for every row, no per-row tuning.

    python -m mpipipe plan --reproduce megatron-sc21

Each row runs as the paper's artifact ran it (NVIDIA/Megatron-LM examples/sc21/run_table_1.sh,
the columns micro_batch, layers_per_virtual_stage and ddp of the CSV): its micro-batch size (so
m = batch / (dp x micro-batch)), the interleaved schedule where the script sets layers per
virtual stage (v = layers / pp / that), else 1F1B; PyTorch DDP (the gradient all-reduce overlaps
the backward pass, train's --overlap on) or Megatron's local DDP (after the pipeline drains:
--overlap off). Stated by the paper: full recomputation of every layer (the script's
--recompute-method uniform), fp16 with fp32 master weights and gradients, Adam. TFLOP/s are
counted with the paper's formula so that the columns compare. Megatron-LM's defaults
(megatron/arguments.py: --attention-dropout 0.1, --hidden-dropout 0.1; the script sets
neither) add dropout's memory traffic (GPT.dropout).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from mpipipe.plan.cost import GPT, Layout
from mpipipe.plan.machine import load
from mpipipe.plan.predict import predict

DATA = Path(__file__).with_name("data") / "megatron_sc21.csv"
SEQ, VOCAB = 2048, 51200  # the paper, section 5.1: every model


def rows() -> list[dict[str, str]]:
    lines = [x for x in DATA.read_text().splitlines() if not x.startswith("#")]
    return list(csv.DictReader(lines))


def layout_of(r: dict[str, str]) -> tuple[GPT, Layout]:
    """The model and the layout the artifact ran for one row of the table."""
    tp, pp, gpus, batch = int(r["tp"]), int(r["pp"]), int(r["gpus"]), int(r["batch"])
    layers, h, mbs = int(r["layers"]), int(r["hidden"]), int(r["micro_batch"])
    per_virtual = int(r["layers_per_virtual_stage"])
    dp = gpus // (tp * pp)
    model = GPT(layers, h, int(r["heads"]), SEQ, VOCAB, batch, "fp16", "adamw", dropout=True)
    v = layers // (pp * per_virtual) if per_virtual else 1
    schedule = "interleaved" if v > 1 else "1f1b"
    overlap = r["ddp"] == "torch"
    m = batch // (dp * mbs)
    return model, Layout(pp, dp, tp, schedule, v, m, "full", overlap=overlap, runtime="megatron")


def paper_flops(batch: int, s: int, layers: int, h: int, vocab: int) -> float:
    """FLOPs per iteration as the paper counts them (its equation 3, with recomputation)."""
    return 96 * batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (16 * layers * h))


def reproduce(machine_spec: str = "selene-a100") -> str:
    machine = load(machine_spec)
    lines = [
        f"Megatron SC21 Table 1 on {machine.name} (predicted by mpipipe plan; published)",
        "",
        "| params | GPUs | tp | pp | dp | batch | layout (the artifact's) | published TFLOP/s | "
        "predicted | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows():
        model, lay = layout_of(r)
        gpus = int(r["gpus"])
        work = paper_flops(model.global_batch, SEQ, model.layers, model.d_model, VOCAB)
        got = work / gpus / 1e12 / predict(model, lay, machine).step_time
        published = float(r["tflops_per_gpu"])
        err = got / published - 1
        errors.append(abs(err))
        b = lay.micro_batch(model)
        lines.append(
            f"| {float(r['params_b']):g}B | {gpus} | {lay.tp} | {lay.pp} | {lay.dp} | "
            f"{model.global_batch} | {lay.label()} b={b} | {published:.0f} | {got:.0f} | "
            f"{err:+.1%} |"
        )
    lines += [
        "",
        f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%} over "
        f"{len(errors)} rows",
    ]
    return "\n".join(lines)
