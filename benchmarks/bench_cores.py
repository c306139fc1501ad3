"""Element-wise work on the cores a rank owns (#18): the options measured, then the goal.

1. Each element-wise kernel of a GPT step (GELU forward + backward on (B T, 4C), the causal
   softmax forward + backward on (B, H, T, T), LayerNorm forward + backward on (B T, C), one
   AdamW step over a block's parameters) timed as one NumPy call (today's one thread), on
   blocks of rows over the rank's threads (`mpipipe.rowwise`, what the backend now does), the
   same right after a matrix product on the BLAS's threads (OpenBLAS's idle threads spin a while
   after a product and could take the cores from the blocks), and, where numexpr is importable,
   as a fused numexpr expression on the same threads (GELU forward and AdamW: the formulas it
   fuses; numexpr is not a dependency: `pip install numexpr` to see its column). Each row prints
   the ratio to the one-call time (tests/test_rowwise.py checks the blocks bitwise against it).
2. One process with N threads against N pipeline ranks of one thread each, same work (GPT
   8 layers x 256, seq 128, batch 32 in 8 micro-batches, AdamW): step time ratio (goal <= 1).
   The process runs N micro-batches at once (`--microbatch-threads auto`, mbthreads.py); the
   earlier way, one micro-batch at a time with its products and element-wise work on the N
   threads (`off`), is measured beside it, and both for the default model (4 x 128, 4
   micro-batches) too, where the work per micro-batch is smaller. Rounds interleave the runs.

The machine is shared and noisy: run it when `uptime` shows a load below ~3, and read ratios.

    python benchmarks/bench_cores.py [--threads N] [--steps 6] [--rounds 3] [--skip-ranks]
                                     [--skip-kernels]
                                     [--realtime]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import train  # noqa: E402

from mpipipe import rowwise  # noqa: E402
from mpipipe.kernels.attention import _causal_softmax, _softmax_backward  # noqa: E402
from mpipipe.kernels.gelu import gelu_backward_input, gelu_forward  # noqa: E402
from mpipipe.kernels.layernorm import layernorm_backward_input, layernorm_forward  # noqa: E402
from mpipipe.optim import AdamW  # noqa: E402

try:
    import numexpr
except ImportError:
    numexpr = None

B, T, C, H = 32, 128, 256, 4  # one rank's whole batch at the issue's configuration
GELU_TANH = "tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))"
GELU_GRAD = (
    "dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 0.134145 * x * x))"
)


def best(fn: Callable[[], object], repeats: int = 7, before: Callable[[], object] = int) -> float:
    """The best wall time of fn() (after one warm-up), each time right after before()."""
    fn()
    times = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def kernels(rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    """The element-wise work of one micro-batch-sized call of each kernel, as closures."""
    x = rng.standard_normal((B * T, 4 * C)).astype(np.float32)  # (N, 4C)
    _, gcache = gelu_forward(x)
    scores = rng.standard_normal((B * H, T, T)).astype(np.float32)  # (B H, T, T)
    att = scores.copy()
    _causal_softmax(att)
    work = np.empty_like(scores)
    ln_x = rng.standard_normal((B * T, C)).astype(np.float32)  # (N, C)
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    _, lcache = layernorm_forward(ln_x, g, b)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in block_shapes().items()}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    opt = AdamW(params)

    def softmax() -> Any:
        work[...] = scores
        rowwise.each_rows(_causal_softmax, work)
        rowwise.each_rows(_softmax_backward, work, att)
        return work

    return {
        "GELU fwd+bwd (N, 4C)": lambda: (gelu_forward(x)[0], gelu_backward_input(x, gcache)),
        "causal softmax fwd+bwd (B H, T, T)": softmax,
        "LayerNorm fwd+bwd (N, C)": lambda: (
            layernorm_forward(ln_x, g, b)[0],
            layernorm_backward_input(ln_x, lcache, g),
        ),
        "AdamW step, one block's parameters": lambda: opt.step(grads, 1e-4),
    }


def block_shapes() -> dict[str, tuple[int, ...]]:
    return {"qkv": (C, 3 * C), "proj": (C, C), "fc": (C, 4 * C), "out": (4 * C, C)}


def numexpr_versions(rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    """The fused-expression form of the kernels numexpr can express whole."""
    x = rng.standard_normal((B * T, 4 * C)).astype(np.float32)
    dout = rng.standard_normal((B * T, 4 * C)).astype(np.float32)
    out, t, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def gelu() -> None:
        numexpr.evaluate(GELU_TANH, local_dict={"x": x}, out=t)
        numexpr.evaluate("0.5 * x * (1 + t)", local_dict={"x": x, "t": t}, out=out)
        numexpr.evaluate(GELU_GRAD, local_dict={"x": x, "t": t, "dout": dout}, out=dx)

    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in block_shapes().items()}
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}

    def adamw() -> None:
        for k in p:
            d = {"p": p[k], "g": g[k], "m": m[k], "v": v[k]}
            numexpr.evaluate("0.9 * m + 0.1 * g", local_dict=d, out=d["m"])
            numexpr.evaluate("0.95 * v + 0.05 * g * g", local_dict=d, out=d["v"])
            update = "p * 0.99999 - 1e-3 * m / (sqrt(v / 0.05) + 1e-8)"
            numexpr.evaluate(update, local_dict=d, out=d["p"])

    return {
        "GELU fwd+bwd (N, 4C)": gelu,
        "AdamW step, one block's parameters": adamw,
    }


def options(threads: int) -> None:
    rng = np.random.default_rng(0)
    fused = numexpr_versions(rng) if numexpr is not None else {}
    a = np.ones((1024, 1024), np.float32)
    print(f"element-wise kernels, float32, B={B} T={T} C={C} H={H}; ms (ratio to one call)")
    print(
        "| kernel | one call | blocks, 1 thread | blocks, "
        f"{threads} threads | the same after a GEMM | numexpr, 1 thread | numexpr, {threads} |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = [0.0, 0.0]
    for name, fn in kernels(rng).items():
        times = []
        for n, block in ((1, 0), (1, rowwise.BLOCK), (threads, rowwise.BLOCK)):
            rowwise.use_threads(n, block)
            times.append(best(fn))
        times.append(best(fn, before=lambda: a @ a))  # right after the BLAS threads' work
        rowwise.use_threads(1)
        if name in fused:
            for n in (1, threads):
                numexpr.set_num_threads(n)
                times.append(best(fused[name]))
        cells = [f"{t * 1e3:.1f} ({t / times[0]:.2f})" for t in times]
        cells += ["-"] * (6 - len(cells))
        print(f"| {name} | " + " | ".join(cells) + " |")
        worst = [max(worst[0], times[1] / times[0]), max(worst[1], times[2] / times[0])]
    print(
        "summary: cores | worst element-wise kernel on blocks, 1 thread / one call "
        f"| {worst[0]:.2f} | <= 1.0"
    )
    print(
        f"summary: cores | worst element-wise kernel on blocks, {threads} threads / one call "
        f"| {worst[1]:.2f} | <= {1 / threads + 0.25:.2f}"
    )


ISSUE = "--layers 8 --d-model 256 --heads 4 --seq-len 128 --global-batch 32 --microbatches 8"


def step_time(ranks: int, steps: int, *extra: str, realtime: bool = False) -> float:
    records = train(ranks, "--optimizer", "adamw", "--steps", str(steps), "--eval-every", "0",
                    *extra, realtime=realtime)  # fmt: skip
    return statistics.median(r["step_time_s"] for r in records[1:] if "step_time_s" in r)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step runs")
    p.add_argument("--skip-ranks", action="store_true", help="only the kernels")
    p.add_argument("--skip-kernels", action="store_true", help="only the step runs")
    p.add_argument(
        "--realtime", action="store_true", help="step runs at real-time priority (chrt --rr 10)"
    )
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_kernels:
        options(args.threads)
    if args.skip_ranks:
        return 0
    off = ("--microbatch-threads", "off")
    runs: dict[str, tuple[int, tuple[str, ...]]] = {
        f"1 process, {args.threads} micro-batches at once (auto)": (1, (*ISSUE.split(),)),
        f"1 process, products and element-wise on {args.threads} threads (off)": (
            1,
            (*ISSUE.split(), *off),
        ),
        f"{args.threads} pipeline ranks x 1 thread": (args.threads, (*ISSUE.split(),)),
        "the default model (4 x 128), 1 process, auto": (1, ()),
        "the default model (4 x 128), 1 process, off": (1, off),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: the machine's load drifts within minutes
        for name, (ranks, extra) in runs.items():
            times[name].append(step_time(ranks, args.steps, *extra, realtime=args.realtime))
    print("GPT 8x256, seq 128, 32 in 8 micro-batches, AdamW (unless named); median step time of")
    print("each run, ms:")
    for name, ts in times.items():
        print(f"  {name}: {', '.join(f'{t * 1e3:.0f}' for t in ts)}")
    one, off_t, ranks, small, small_off = (statistics.median(ts) for ts in times.values())
    print(f"(off) / (pipeline ranks): {off_t / ranks:.2f}")
    print(
        f"summary: cores | 1 process x {args.threads} threads / {args.threads} pipeline ranks "
        f"x 1 thread, step time (medians of {args.rounds} rounds) | {one / ranks:.2f} | <= 1.0"
    )
    print(
        f"summary: cores | the default model, 1 process: micro-batches at once / one at a "
        f"time (auto / off) | {small / small_off:.2f} | <= 1.0"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
