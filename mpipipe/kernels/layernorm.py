"""Layer normalisation over the last dimension (llm.c's derivation, term by term)."""

from __future__ import annotations

from mpipipe.xp import Array

EPS = 1e-5


def layernorm_forward(x: Array, g: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    # x (..., C)  g (C,)  b (C,)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / (var + EPS) ** 0.5  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * g + b  # (..., C)
    return out, (xhat, rstd)


def layernorm_backward_input(dout: Array, cache: tuple[Array, Array], g: Array) -> Array:
    xhat, rstd = cache
    dxhat = dout * g  # (..., C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
    return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd  # (..., C)


def layernorm_backward_weight(
    dout: Array, cache: tuple[Array, Array], dg: Array, db: Array
) -> None:
    xhat, _ = cache
    c = dout.shape[-1]
    dg += (dout * xhat).reshape(-1, c).sum(axis=0)  # (C,)
    db += dout.reshape(-1, c).sum(axis=0)  # (C,)
