"""Each layer's forward + backward against the machine's matrix-product peak, same run.

For every layer at micro-batch 8 x sequence 256 and the given widths, times forward,
backward_input and backward_weight together and reports achieved GFLOP/s (FLOPs counted
analytically: matrix products and attention's two batched products) against the peak of one
large `xp.matmul` of the same dtype measured in the same run. Memory-bound layers (LayerNorm,
GELU, embedding) do few FLOPs: they are reported as GB/s moved against a large array copy
(`out[...] = a`) in the same run instead.

Then the attention core alone at micro-batch 1, d_model 256 (4 heads of 64), for sequence lengths
128 to 4096: the tiled kernel (kernels/tiled_attention.py) against the dense reference
(kernels/attention.py), same run: time of forward + backward, the bytes its context keeps for
backward, and the peak of the bytes NumPy allocated during forward + backward (tracemalloc).

    python benchmarks/bench_kernels.py [--widths 256,512] [--dtype float32] [--seqs 128,...]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from mpipipe.kernels.attention import attention_backward_input, attention_forward
from mpipipe.kernels.tiled_attention import tiled_attention_backward_input, tiled_attention_forward
from mpipipe.layers import GELU, MLP, Attention, Block, Embedding, Head, Init, LayerNorm, Linear
from mpipipe.runtime import reuse_host_memory

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
    }[name.removesuffix("_tiled")]  # the tiled kernel counted as dense: masked half included
    return 3.0 * fwd


def saved_bytes(ctx: tuple[object, ...]) -> int:
    """Bytes of the distinct buffers a context keeps alive (views count their base once)."""
    bases = {}
    for a in ctx:
        if isinstance(a, np.ndarray):
            base = a if a.base is None else a.base
            bases[id(base)] = base.nbytes
    return sum(bases.values())


KERNELS = {
    "dense": (attention_forward, attention_backward_input),
    "tiled": (tiled_attention_forward, tiled_attention_backward_input),
}


def attention_by_length(seqs: list[int], dtype: np.dtype, c: int = 256) -> None:
    """The attention core at micro-batch 1, width c, for each sequence length: tiled vs dense."""
    h = c // HEAD
    print(f"\nattention core, micro-batch 1, d_model {c} ({h} heads of {HEAD}), {dtype}")
    print(
        "| seq | dense ms | tiled ms | tiled / dense time | dense saved MiB | tiled saved MiB "
        "| dense peak MiB | tiled peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mib, ratios = 2.0**20, {}
    for t in seqs:
        rng = np.random.default_rng(0)
        qkv = rng.normal(size=(1, t, 3 * c)).astype(dtype)
        dout = rng.normal(size=(1, t, c)).astype(dtype)
        row = {}
        for name, (fwd, bwd) in KERNELS.items():

            def run(fwd=fwd, bwd=bwd, qkv=qkv, dout=dout) -> None:  # type: ignore[no-untyped-def]
                y, ctx = fwd(qkv, h)
                bwd(dout, ctx)

            secs = best_time(run, 3 if t <= 1024 else 1, min_s=0.05)
            tracemalloc.start()
            y, ctx = fwd(qkv, h)
            bwd(dout, ctx)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            row[name] = (secs, saved_bytes(ctx), peak)
            del y, ctx
        (dt, ds, dp), (tt, ts, tp) = row["dense"], row["tiled"]
        ratios[t] = tt / dt
        print(
            f"| {t} | {dt * 1e3:.1f} | {tt * 1e3:.1f} | {tt / dt:.2f} | {ds / mib:.1f} | "
            f"{ts / mib:.2f} | {dp / mib:.1f} | {tp / mib:.1f} |"
        )
    longest = max(seqs)
    print(
        f"summary: kernels | tiled / dense attention time at seq {longest} "
        f"(at {min(seqs)}: {ratios[min(seqs)]:.2f}) | {ratios[longest]:.2f} | < 1"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,512")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seqs", default="128,256,512,1024,2048,4096", help="attention lengths")
    args = p.parse_args()
    reuse_host_memory()  # as a training run does: temporaries stay mapped between calls
    dtype = np.dtype(args.dtype)
    peak, bw = matmul_peak(dtype), copy_bandwidth(dtype)
    print(
        f"micro-batch {B} x seq {T}, {dtype}; matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"copy {bw / 1e9:.1f} GB/s (same run)"
    )
    print("| layer | width | ms (fwd+bwd) | achieved | of reference |")
    print("|---|---|---|---|---|")
    rows = []
    for c in [int(w) for w in args.widths.split(",") if w]:  # --widths "": attention only
        init = Init.for_layer(0, 0, dtype, np)
        x = np.random.default_rng(0).normal(size=(B, T, c)).astype(dtype)
        tokens = np.random.default_rng(1).integers(0, V, size=(B, T))
        layers = {
            "linear": (Linear(init, c, c), x),
            "attention": (Attention(init, c, c // HEAD), x),
            "attention_tiled": (Attention(init, c, c // HEAD, kernel="tiled"), x),
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
    if args.seqs:
        attention_by_length([int(t) for t in args.seqs.split(",")], dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
