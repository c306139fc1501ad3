"""One GPT training step on one rank against its "math floor".

The floor is the sum of the step's matrix products (every forward, input-gradient and
weight-gradient product of every layer and micro-batch, attention's batched products included),
each timed alone on contiguous operands (best of 7), after every step, between steps and outside
their clocks: the machine's speed drifts over minutes (a floor timed once after training moved
2823-3231 ms between runs of the same code), so each step is held against the floor of its own
minute, and step / floor is the median of the steps' ratios. It is the framework's overhead:
everything that is not a matrix product (elementwise kernels, copies, the optimizer, Python).
The floor counts attention's products whole (T x T), whichever kernel runs: the tiled kernel
skips the masked half, so the same floor serves both. Goals: <= 1.3 with one BLAS thread
(a rank sharing a node), <= 1.5 with the machine's threads, for d_model 256, 4 layers, seq 256,
micro-batch 8. With several threads the process runs a micro-batch on each at once, one BLAS
thread each (`--microbatch-threads auto`, mpipipe/mbthreads.py). Rows: that; in child processes
(OpenBLAS reads its environment when it loads) the earlier way, one micro-batch at a time with
the products on the BLAS's threads and the element-wise work on as many (mpipipe/rowwise.py),
as it is and with OPENBLAS_THREAD_TIMEOUT=4 (unless set already: OpenBLAS's idle threads then
sleep at once instead of spinning on the cores the element-wise threads need); and one thread.

    python benchmarks/bench_step.py [--d-model 256] [--layers 4] [--seq-len 256]
                                    [--attention tiled|dense] [--microbatch-threads auto|off]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np


def products(c: int, layers: int, t: int, b: int, heads: int, vocab: int = 256) -> list:
    """(m, k, n, batch) of every matrix product in one micro-batch's F + B + W."""
    n, d = b * t, c // heads
    lin = []
    for cin, cout in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] * layers + [(c, vocab)]:
        lin += [(n, cin, cout, 1), (n, cout, cin, 1), (cin, n, cout, 1)]  # fwd, dx, dW
    att = [(t, d, t, b * heads), (t, t, d, b * heads)] * 3 * layers  # fwd 2, bwd 4 (+qk again)
    return lin + att[: 6 * layers]


def operands(m: int, k: int, n: int, batch: int, dtype: np.dtype) -> tuple:
    """Contiguous (batch of) m x k and k x n operands of one product."""
    lead = (batch,) if batch > 1 else ()
    return np.ones((*lead, m, k), dtype), np.ones((*lead, k, n), dtype)


def time_product(m: int, k: int, n: int, batch: int, dtype: np.dtype) -> float:
    a, w = operands(m, k, n, batch, dtype)
    a @ w
    best = float("inf")
    for _ in range(7):  # best of 7: multi-threaded products vary most between repeats here
        t0 = time.perf_counter()
        a @ w
        best = min(best, time.perf_counter() - t0)
    return best


QUIET = "OPENBLAS_THREAD_TIMEOUT=4"  # OpenBLAS's idle threads sleep at once instead of spinning


def child_row(env: dict[str, str], *args: str) -> tuple[float, float, float, float]:
    """(step ms, floor ms, step / floor, tokens/s) of this benchmark run again in a child with
    `env` added (and `args` after the parent's)."""
    out = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], *args, "--one-thread-row"],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ROW "))
    s, f, r, t = map(float, line.split()[1:])
    return s, f, r, t


def products_alone(shapes: list, m: int, dtype: np.dtype) -> Callable[[], float]:
    """A clock of the step's products alone, each run once per micro-batch as the step runs
    them (no best of 7): what a step with nothing but its products would take now."""
    ops = [operands(*shape, dtype) for shape in shapes]

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(m):
            for a, w in ops:
                a @ w
        return time.perf_counter() - t0

    return run


class FloorBetweenSteps(io.StringIO):
    """train's output stream: each step's log line (printed after the step's clock stopped,
    before the next one starts) has the floor timed again, and the products alone, so every
    step has a floor of its own minute."""

    def __init__(self, floor: Callable[[], float], alone: Callable[[], float]) -> None:
        super().__init__()
        self.floor, self.alone = floor, alone
        self.floors: list[float] = []
        self.alones: list[float] = []

    def write(self, text: str) -> int:
        if text.startswith("step "):
            self.floors.append(self.floor())
            self.alones.append(self.alone())
        return super().write(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--attention", default="dense", choices=("tiled", "dense"))
    p.add_argument("--microbatch-threads", default="auto", choices=("auto", "off"))
    p.add_argument("--one-thread-row", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    from mpipipe import TrainConfig, train

    c, L, t, b, m = args.d_model, args.layers, args.seq_len, args.micro_batch, args.microbatches
    heads = max(1, c // 64)
    cfg = TrainConfig(
        layers=L,
        d_model=c,
        heads=heads,
        seq_len=t,
        global_batch=b * m,
        microbatches=m,
        steps=args.steps,
        eval_batches=1,
        eval_every=0,
        log_every=1,
        peak_tflops=1.0,
        attention=args.attention,
        microbatch_threads=args.microbatch_threads,
    )
    dtype = np.dtype(cfg.dtype)
    shapes = products(c, L, t, b, heads)
    out = FloorBetweenSteps(
        lambda: m * sum(time_product(*shape, dtype) for shape in shapes),
        products_alone(shapes, m, dtype),
    )
    result = train(cfg, out=out)
    later = result.history[1:]  # the first step warms up
    steps = [r["step_time_s"] for r in later]
    floors = out.floors[1 : 1 + len(later)]  # each timed right after its step
    assert len(floors) == len(steps), (len(floors), len(steps))
    step, floor = statistics.median(steps), statistics.median(floors)
    each = [s / f for s, f in zip(steps, floors, strict=True)]
    ratio = statistics.median(each)
    tokens = statistics.median(r["tokens_per_s"] for r in later)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", str(os.cpu_count()))
    if args.one_thread_row:  # a child run: one line for the parent's table
        print(f"ROW {step * 1e3:.1f} {floor * 1e3:.1f} {ratio:.4f} {tokens:.0f}")
        return 0
    mode = ", micro-batches at once" if args.microbatch_threads == "auto" else ", one at a time"
    rows = [(f"{threads}{mode * (threads != '1')}", step * 1e3, floor * 1e3, ratio, tokens)]
    if threads != "1":
        if args.microbatch_threads == "auto":  # the earlier way: BLAS and element-wise threads
            off = ("--microbatch-threads", "off")
            rows.append((f"{threads}, one at a time", *child_row({}, *off)))
            if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:  # idle BLAS threads sleep at once
                quiet = {"OPENBLAS_THREAD_TIMEOUT": "4"}
                rows.append((f"{threads}, one at a time, {QUIET}", *child_row(quiet, *off)))
        # as a pipeline rank runs when ranks share a node: one BLAS thread
        one = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        rows.append(("1", *child_row(one)))
    print(f"GPT {L}x{c}, seq {t}, {m} micro-batches of {b}, {cfg.dtype}, 1 rank, {args.attention}")
    print("| threads | step ms | math floor ms | step / floor | tokens/s |")
    print("|---|---|---|---|---|")
    for th, st, fl, r, tok in rows:
        print(f"| {th} | {st:.1f} | {fl:.1f} | {r:.2f} | {tok:.0f} |")
    print("(medians over the steps after the first; step / floor: the median of each step's")
    print(" ratio to the floor timed right after it: " + ", ".join(f"{x:.2f}" for x in each) + ")")
    alone = statistics.median(out.alones[1 : 1 + len(later)])
    print(
        f"the products alone, each once as a step runs them (timed after each step too): "
        f"{alone * 1e3:.1f} ms, {alone / floor:.2f} x the floor: the part of step / floor that "
        "is the machine's noise rather than the framework (informative; the goal is against "
        "the floor)"
    )
    goal = 1.3 if threads == "1" else 1.5
    print(f"goal step / floor <= {goal}: {'met' if ratio <= goal else 'NOT met'}")
    print(
        f"summary: step | 1-rank GPT step / math floor, threads: {rows[0][0]}, {args.attention} "
        f"attention ({tokens:.0f} tokens/s) | {ratio:.2f} | <= {goal}"
    )
    for th, _, _, r, _ in rows[1:]:
        print(
            f"summary: step | the same, threads: {th} | {r:.2f} | <= {1.3 if th == '1' else 1.5}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
