"""GPT training step on one GPU: tokens/s and achieved TFLOP/s against the peak of a plain large
cuBLAS matmul (bf16 and fp32) measured in the same run. Needs CuPy and a GPU.

    python benchmarks/bench_gpu.py [--d-model 2048] [--layers 4] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import io
import statistics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    import cupy

    from mpipipe import TrainConfig, train
    from mpipipe.metrics import model_flops_per_step

    def peak(dtype: str, n: int = 8192) -> float:
        a = cupy.ones((n, n), dtype=dtype)
        a @ a
        cupy.cuda.Device().synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            a @ a
            end.record()
            end.synchronize()
            best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return 2 * n**3 / best

    fp32 = peak("float32")
    c, L, t, b = args.d_model, args.layers, args.seq_len, args.micro_batch
    cfg = TrainConfig(
        layers=L,
        d_model=c,
        heads=c // 128,
        seq_len=t,
        global_batch=4 * b,
        microbatches=4,
        steps=args.steps,
        eval_batches=1,
        eval_every=0,
        backend="cupy",
        peak_tflops=fp32 / 1e12,
    )
    result = train(cfg, out=io.StringIO())
    later = result.history[1:]
    step = statistics.median(r["step_time_s"] for r in later)
    n_params = sum(v.size for v in result.params.values())
    flops = model_flops_per_step(
        {"kind": "gpt", "n_layer": L, "d_model": c, "seq_len": t}, n_params, cfg.global_batch
    )
    print(f"GPT {L}x{c}, seq {t}, fp32 compute; cuBLAS fp32 peak {fp32 / 1e12:.1f} TFLOP/s")
    print("| step ms | tokens/s | TFLOP/s | of fp32 matmul peak |")
    print("|---|---|---|---|")
    print(
        f"| {step * 1e3:.1f} | {cfg.global_batch * t / step:.0f} | {flops / step / 1e12:.1f} | "
        f"{flops / step / fp32:.2f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
