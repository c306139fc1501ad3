"""The published reproduction: predicted per-GPU TFLOP/s for the rows of the Megatron SC21
weak-scaling table (plan/data/megatron_sc21.csv) on the Selene preset, next to the published
figures. One machine file for every row, no per-row tuning.

    python -m mpipipe plan --reproduce megatron-sc21

Assumed where the table is silent: micro-batch size 1 (so m = batch / dp micro-batches), the
1F1B schedule (PipeDream-Flush, the paper's default; the interleaved column uses 2 virtual
stages where the layers allow), full recomputation (as the paper states), fp16 with fp32 master
weights and gradients, AdamW, and the data-parallel all-reduce of fp32 gradients after the
backward pass, not overlapped with it (Megatron-LM of 2021 reduced its contiguous gradient
buffer once the pipeline had drained; overlapping came later): train's `--overlap off`. TFLOP/s
are counted with the paper's formula so that the columns compare.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from mpipipe.plan.cost import GPT, Layout
from mpipipe.plan.machine import load
from mpipipe.plan.predict import predict

DATA = Path(__file__).with_name("data") / "megatron_sc21.csv"


def rows() -> list[dict[str, float]]:
    lines = [x for x in DATA.read_text().splitlines() if not x.startswith("#")]
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(lines)]


def paper_flops(batch: float, s: int, layers: int, h: int, vocab: int) -> float:
    """FLOPs per iteration as the paper counts them (its equation 3, with recomputation)."""
    return 96 * batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (16 * layers * h))


def reproduce(machine_spec: str = "selene-a100", seq: int = 2048, vocab: int = 51200) -> str:
    machine = load(machine_spec)
    lines = [
        f"Megatron SC21 Table 1 on {machine.name} (predicted by mpipipe plan; published)",
        "",
        "| params | GPUs | tp | pp | dp | batch | published TFLOP/s | predicted 1F1B | error | "
        "predicted interleaved v=2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows():
        tp, pp, gpus, batch = int(r["tp"]), int(r["pp"]), int(r["gpus"]), int(r["batch"])
        layers, h = int(r["layers"]), int(r["hidden"])
        dp = gpus // (tp * pp)
        model = GPT(layers, h, int(r["heads"]), seq, vocab, batch, "fp16", "adamw")
        m = batch // dp
        work = paper_flops(batch, seq, layers, h, vocab) / gpus / 1e12
        base = Layout(pp, dp, tp, "1f1b", 1, m, "full", overlap=False)
        got = work / predict(model, base, machine).step_time
        err = got / r["tflops_per_gpu"] - 1
        errors.append(abs(err))
        inter = "-"
        if pp > 1 and m % pp == 0 and layers % (2 * pp) == 0:
            lay = base.with_(schedule="interleaved", v=2)
            inter = f"{work / predict(model, lay, machine).step_time:.0f}"
        lines.append(
            f"| {r['params_b']:g}B | {gpus} | {tp} | {pp} | {dp} | {batch} | "
            f"{r['tflops_per_gpu']:.0f} | {got:.0f} | {err:+.1%} | {inter} |"
        )
    lines += [
        "",
        f"1F1B: median |error| {statistics.median(errors):.1%}, max {max(errors):.1%} over "
        f"{len(errors)} rows",
    ]
    return "\n".join(lines)
