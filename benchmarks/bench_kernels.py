"""Each layer's forward + backward against the machine's matrix-product peak, same run.

For every layer at micro-batch 8 x sequence 256 and the given widths, times forward,
backward_input and backward_weight together and reports achieved GFLOP/s (FLOPs counted
analytically: matrix products and attention's two batched products) against the peak of one
large `xp.matmul` of the same dtype measured in the same run. Memory-bound layers (LayerNorm,
GELU, embedding) do few FLOPs: they are reported as GB/s moved against a large array copy
(`out[...] = a`) in the same run instead.

    python benchmarks/bench_kernels.py [--widths 256,512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from mpipipe.layers import GELU, MLP, Attention, Block, Embedding, Head, Init, LayerNorm, Linear

B, T, V, HEAD = 8, 256, 256, 64


def best_time(fn: Callable[[], object], repeats: int, min_s: float = 0.2) -> float:
    fn()  # warm up
    best, total, n = float("inf"), 0.0, 0
    while n < repeats or total < min_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def matmul_peak(dtype: np.dtype, n: int = 2048) -> float:
    a = np.ones((n, n), dtype)
    return 2 * n**3 / best_time(lambda: a @ a, 3)


def copy_bandwidth(dtype: np.dtype, nbytes: int = 256 * 2**20) -> float:
    a = np.ones(nbytes // np.dtype(dtype).itemsize, dtype)
    out = np.empty_like(a)

    def copy() -> None:
        out[...] = a

    return 2 * nbytes / best_time(copy, 3)  # read + write


def step(layer: object, x: np.ndarray) -> Callable[[], None]:
    def run() -> None:
        y, ctx = layer.forward(x)
        dx, w = layer.backward_input(np.ones_like(y), ctx)
        layer.backward_weight(w)

    return run


def flops(name: str, c: int) -> float:
    """Forward + backward FLOPs (backward = 2 x forward for the products)."""
    n, h = B * T, c // HEAD
    lin = lambda i, o: 2 * n * i * o  # noqa: E731
    attn_core = 2 * 2 * B * h * T * T * HEAD  # q k^T and att v
    fwd = {
        "linear": lin(c, c),
        "attention": lin(c, 3 * c) + attn_core + lin(c, c),
        "mlp": lin(c, 4 * c) + lin(4 * c, c),
        "block": lin(c, 3 * c) + attn_core + lin(c, c) + lin(c, 4 * c) + lin(4 * c, c),
        "head": lin(c, V),
    }[name]
    return 3.0 * fwd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,512")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dtype = np.dtype(args.dtype)
    peak, bw = matmul_peak(dtype), copy_bandwidth(dtype)
    print(
        f"micro-batch {B} x seq {T}, {dtype}; matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"copy {bw / 1e9:.1f} GB/s (same run)"
    )
    print("| layer | width | ms (fwd+bwd) | achieved | of reference |")
    print("|---|---|---|---|---|")
    rows = []
    for c in map(int, args.widths.split(",")):
        init = Init.for_layer(0, 0, dtype, np)
        x = np.random.default_rng(0).normal(size=(B, T, c)).astype(dtype)
        tokens = np.random.default_rng(1).integers(0, V, size=(B, T))
        layers = {
            "linear": (Linear(init, c, c), x),
            "attention": (Attention(init, c, c // HEAD), x),
            "mlp": (MLP(init, c), x),
            "block": (Block(init, c, c // HEAD, 4), x),
            "head": (Head(init, c, V), x),
            "layernorm": (LayerNorm(init, c), x),
            "gelu": (GELU(), x),
            "embedding": (Embedding(init, V, c, T), tokens),
        }
        for name, (layer, inp) in layers.items():
            t = best_time(step(layer, inp), args.repeats)
            if name in ("layernorm", "gelu", "embedding"):
                moved = 6 * B * T * c * dtype.itemsize  # x, y, dy, dx (+ saved terms), roughly
                rate, ref, unit = moved / t, bw, "GB/s"
            else:
                rate, ref, unit = flops(name, c) / t, peak, "GFLOP/s"
            rows.append((name, c, rate / ref))
            print(f"| {name} | {c} | {t * 1e3:.2f} | {rate / 1e9:.1f} {unit} | {rate / ref:.2f} |")
    flop_bound = [
        r for r in rows if r[0] not in ("layernorm", "gelu", "embedding") and r[1] >= 512
    ]
    worst = min(flop_bound, key=lambda r: r[2]) if flop_bound else None
    if worst:
        print(
            f"goal (d >= 512, FLOP-bound layers >= 0.50 of peak): worst {worst[0]} "
            f"{worst[2]:.2f}: {'met' if worst[2] >= 0.5 else 'NOT met'}"
        )
        print(
            f"summary: kernels | worst FLOP-bound layer at d >= 512 ({worst[0]}) vs matmul "
            f"peak | {worst[2]:.2f} | >= 0.50"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
