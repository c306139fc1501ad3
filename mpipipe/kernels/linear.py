"""Affine map y = x @ w + b over the last dimension."""

from __future__ import annotations

from mpipipe.xp import Array


def linear_forward(x: Array, w: Array, b: Array | None) -> tuple[Array, Array]:
    # x (..., Cin)  w (Cin, Cout)  b (Cout,)
    out = x @ w  # (..., Cout)
    if b is not None:
        out += b
    return out, x


def linear_backward_input(dout: Array, w: Array) -> Array:
    return dout @ w.T  # (..., Cin)


def linear_backward_weight(dout: Array, x: Array, dw: Array, db: Array | None) -> None:
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin)
    d2 = dout.reshape(-1, dout.shape[-1])  # (N, Cout)
    dw += x2.T @ d2  # (Cin, Cout)
    if db is not None:
        db += d2.sum(axis=0)  # (Cout,)
