"""Affine map y = x @ w + b over the last dimension.

Products are cast back to the compute dtype: NumPy's bfloat16 matmul returns float32 (CuPy's
returns bfloat16; `astype(..., copy=False)` is a no-op wherever the dtype already matches). The
bias gradient's sum over rows runs in float32 for 16-bit gradients. Weight gradients are added
through `accumulate.add_into` (a caller may hold the additions back: kernels/accumulate.py)."""

from __future__ import annotations

from mpipipe.kernels.accumulate import add_into
from mpipipe.xp import Array, widen


def linear_forward(x: Array, w: Array, b: Array | None) -> tuple[Array, Array]:
    # x (..., Cin)  w (Cin, Cout)  b (Cout,)
    out = (x @ w).astype(x.dtype, copy=False)  # (..., Cout)
    if b is not None:
        out += b
    return out, x


def linear_backward_input(dout: Array, w: Array) -> Array:
    return (dout @ w.T).astype(dout.dtype, copy=False)  # (..., Cin)


def linear_backward_weight(dout: Array, x: Array, dw: Array, db: Array | None) -> None:
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    d2 = dout.reshape(-1, dout.shape[-1])  # (N, Cout)
    add_into(dw, (x2.T @ d2).astype(dw.dtype, copy=False))  # (Cin, Cout)
    if db is not None:
        add_into(db, widen(d2).sum(axis=0).astype(db.dtype, copy=False))  # (Cout,)
