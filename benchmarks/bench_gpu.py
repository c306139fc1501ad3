"""GPT on one GPU: the cuBLAS matmul peak (bf16 and fp32) at the model's own shapes, then one
block's forward+backward and a whole 1-rank training step as fractions of that peak (MFU), all
in the same run and on CUDA events. Needs CuPy and a GPU (or the fake CuPy, for a rehearsal).

    python benchmarks/bench_gpu.py [--shapes 1024x1024,2048x2048,4096x2048] [--json OUT.json]

A shape is DxT: d_model x sequence length (heads of 128, micro-batch 1, 2 layers per step).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from typing import Any


def elapsed(cupy: Any, work: Any) -> float:
    """Best seconds of `work()` by CUDA events, after a warm-up (the runtime's own timer)."""
    from mpipipe.xp import best_seconds

    return best_seconds(cupy, work)[0]


def matmul_peak(cupy: Any, dtype: Any, m: int, k: int, n: int) -> float:
    """FLOP/s of (m, k) @ (k, n): the MLP's first product at the model's shape."""
    a, b = cupy.ones((m, k), dtype=dtype), cupy.ones((k, n), dtype=dtype)
    return 2 * m * k * n / elapsed(cupy, lambda: a @ b)


def block_seconds(cupy: Any, dtype: Any, d: int, t: int) -> float:
    """One transformer block's forward and backward (input and weight gradients)."""
    from mpipipe.layers import Block, Init

    block = Block(Init.for_layer(0, 0, dtype, cupy), d, max(d // 128, 1), 4)
    x = cupy.ones((1, t, d), dtype=dtype) * 0.01

    def work() -> None:
        y, ctx = block.forward(x)
        _, w = block.backward_input(y, ctx)
        block.backward_weight(w)

    return elapsed(cupy, work)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1024x1024,2048x2048,4096x2048")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import cupy

    from mpipipe import TrainConfig, train
    from mpipipe.metrics import model_flops_per_step
    from mpipipe.xp import bfloat16

    bf16 = bfloat16()
    rows = []
    for shape in args.shapes.split(","):
        d, t = map(int, shape.split("x"))
        peak = {
            "bf16": matmul_peak(cupy, bf16, t, d, 4 * d),
            "fp32": matmul_peak(cupy, "float32", t, d, 4 * d),
        }
        block_flops = (
            2 * 3 * t * (12 * d * d) + 2 * 3 * 2 * t * t * d
        )  # attention whole, as MFU counts it
        block = block_seconds(cupy, bf16, d, t)
        layers = 2
        cfg = TrainConfig(
            layers=layers,
            d_model=d,
            heads=max(d // 128, 1),
            seq_len=t,
            global_batch=4,
            microbatches=4,
            steps=args.steps,
            eval_batches=1,
            eval_every=0,
            backend="cupy",
            dtype="bf16",
            peak_tflops=peak["bf16"] / 1e12,
        )
        result = train(cfg, out=io.StringIO())
        step = statistics.median(r["step_time_s"] for r in result.history[1:])
        n_params = sum(v.size for v in result.params.values())
        model = {"kind": "gpt", "n_layer": layers, "d_model": d, "seq_len": t}
        flops = model_flops_per_step(model, n_params, cfg.global_batch)
        rows.append(
            {
                "shape": shape,
                "bf16_peak_tflops": peak["bf16"] / 1e12,
                "fp32_peak_tflops": peak["fp32"] / 1e12,
                "block_ms": block * 1e3,
                "block_of_bf16_peak": block_flops / block / peak["bf16"],
                "step_ms": step * 1e3,
                "tokens_per_s": cfg.global_batch * t / step,
                "step_mfu_bf16": flops / step / peak["bf16"],
            }
        )
    table = [
        "| d_model x seq | cuBLAS bf16 / fp32 TFLOP/s | block fwd+bwd ms (of bf16 peak) "
        "| bf16 step ms | tokens/s | step MFU (of bf16 peak) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['shape']} | {r['bf16_peak_tflops']:.1f} / {r['fp32_peak_tflops']:.1f} | "
            f"{r['block_ms']:.2f} ({r['block_of_bf16_peak']:.0%}) | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['step_mfu_bf16']:.0%} |"
        )
    print("\n".join(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
