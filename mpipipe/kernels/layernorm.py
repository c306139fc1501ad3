"""Layer normalisation over the last dimension (llm.c's derivation, term by term).

16-bit inputs (fp16, bf16) get their statistics in float32: the mean, variance and rstd, the
backward's two row means, and the weight gradients' sums over rows; `widen` is a no-op for
float32 and float64, whose arithmetic is exactly what it was without it. Forward and the input
gradient are row by row: they run over blocks of rows on the rank's cores (`rowwise.map_rows`);
the weight gradients sum over rows, so they stay one call (a split would change the order)."""

from __future__ import annotations

from mpipipe.rowwise import map_rows
from mpipipe.xp import Array, namespace_of, widen

EPS = 1e-5


def layernorm_forward(x: Array, g: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    # x (..., C)  g (C,)  b (C,)
    out, xhat, rstd = map_rows(lambda xr: _forward(xr, g, b), x.reshape(-1, x.shape[-1]))
    return out.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1))


def layernorm_backward_input(dout: Array, cache: tuple[Array, Array], g: Array) -> Array:
    xhat, rstd = cache  # xhat (..., C) compute dtype, rstd (..., 1) float32 for 16-bit
    c = dout.shape[-1]
    dx = map_rows(
        lambda d, xh, r: _backward_input(d, xh, r, g),
        dout.reshape(-1, c),
        xhat.reshape(-1, c),
        rstd.reshape(-1, 1),
    )
    return dx.reshape(dout.shape)  # (..., C)


def _forward(x: Array, g: Array, b: Array) -> tuple[Array, Array, Array]:
    # x (N, C)  g (C,)  b (C,)
    xp = namespace_of(x)
    c = x.shape[-1]
    xw = widen(x)  # (N, C), float32 for 16-bit x, else x itself
    xhat = xw - xw.mean(axis=-1, keepdims=True)  # (N, C), centred
    var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / c  # (N, 1), no temporary
    rstd = 1.0 / (var + EPS) ** 0.5  # (N, 1)
    xhat *= rstd  # (N, C), normalised in place
    xhat = xhat.astype(x.dtype, copy=False)  # (N, C), the compute dtype (kept for backward)
    out = xhat * g  # (N, C)
    out += b
    return out, xhat, rstd


def _backward_input(dout: Array, xhat: Array, rstd: Array, g: Array) -> Array:
    # dout (N, C)  xhat (N, C) compute dtype  rstd (N, 1) float32 for 16-bit
    xp = namespace_of(dout)
    c = dout.shape[-1]
    dxhat = widen(dout * g)  # (N, C), float32 for 16-bit
    xhat = widen(xhat)  # (N, C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (N, 1)
    mean_dxhat_xhat = xp.einsum("...i,...i->...", dxhat, xhat)[..., None] / c  # (N, 1)
    dxhat -= mean_dxhat  # in place from here on: dx = (dxhat - mean - xhat * mean2) * rstd
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return dxhat.astype(dout.dtype, copy=False)  # (N, C)


def layernorm_backward_weight(
    dout: Array, cache: tuple[Array, Array], dg: Array, db: Array
) -> None:
    xhat, _ = cache
    c = dout.shape[-1]
    dg += widen(dout * xhat).reshape(-1, c).sum(axis=0).astype(dg.dtype, copy=False)  # (C,)
    db += widen(dout).reshape(-1, c).sum(axis=0).astype(db.dtype, copy=False)  # (C,)
