"""Layer normalisation over the last dimension (llm.c's derivation, term by term).

16-bit inputs (fp16, bf16) get their statistics in float32: the mean, variance and rstd, the
backward's two row means, and the weight gradients' sums over rows; `widen` is a no-op for
float32 and float64, whose arithmetic is exactly what it was without it. Forward and the input
gradient are row by row: they run over blocks of rows on the rank's cores (`rowwise.each_rows`,
writing straight into the output arrays);
the weight gradients sum over rows, so they stay one call (a split would change the order)."""

from __future__ import annotations

from mpipipe.kernels.accumulate import add_into
from mpipipe.rowwise import each_rows
from mpipipe.xp import Array, namespace_of, wide_dtype, widen

EPS = 1e-5


def layernorm_forward(x: Array, g: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    # x (..., C)  g (C,)  b (C,)
    xp, c = namespace_of(x), x.shape[-1]
    out, xhat = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)  # C order: filled
    rstd = xp.empty((*x.shape[:-1], 1), wide_dtype(x.dtype))  # float32 for 16-bit
    each_rows(
        lambda x, out, xhat, rstd: _forward(x, out, xhat, rstd, g, b),
        x.reshape(-1, c),
        out.reshape(-1, c),
        xhat.reshape(-1, c),
        rstd.reshape(-1, 1),
    )
    return out, (xhat, rstd)


def layernorm_backward_input(dout: Array, cache: tuple[Array, Array], g: Array) -> Array:
    xhat, rstd = cache  # xhat (..., C) compute dtype, rstd (..., 1) float32 for 16-bit
    xp, c = namespace_of(dout), dout.shape[-1]
    dx = xp.empty(dout.shape, dout.dtype)  # C order: its rows are views
    each_rows(
        lambda d, xhat, rstd, dx: _backward_input(d, xhat, rstd, dx, g),
        dout.reshape(-1, c),
        xhat.reshape(-1, c),
        rstd.reshape(-1, 1),
        dx.reshape(-1, c),
    )
    return dx  # (..., C)


def _forward(x: Array, out: Array, xhat_out: Array, rstd: Array, g: Array, b: Array) -> None:
    # x (N, C)  g (C,)  b (C,); results into out, xhat_out (N, C) and rstd (N, 1)
    xp = namespace_of(x)
    c = x.shape[-1]
    xw = widen(x)  # (N, C), float32 for 16-bit x, else x itself
    wide = xw is not x  # 16-bit: normalise in float32, then cast into xhat_out
    mean = xw.mean(axis=-1, keepdims=True)  # (N, 1)
    xhat = xw - mean if wide else xp.subtract(xw, mean, out=xhat_out)  # (N, C), centred
    var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / c  # (N, 1), no temporary
    xp.divide(1.0, (var + EPS) ** 0.5, out=rstd)  # (N, 1)
    xhat *= rstd  # (N, C), normalised in place
    if wide:
        xhat_out[...] = xhat  # the compute dtype (kept for backward)
    xp.multiply(xhat_out, g, out=out)
    out += b


def _backward_input(dout: Array, xhat: Array, rstd: Array, dx: Array, g: Array) -> None:
    # dout (N, C)  xhat (N, C) compute dtype  rstd (N, 1) float32 for 16-bit; into dx (N, C)
    xp = namespace_of(dout)
    c = dout.shape[-1]
    dxhat = widen(dout * g)  # (N, C), float32 for 16-bit
    xhat = widen(xhat)  # (N, C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (N, 1)
    mean_dxhat_xhat = xp.einsum("...i,...i->...", dxhat, xhat)[..., None] / c  # (N, 1)
    dxhat -= mean_dxhat  # in place from here on: dx = (dxhat - mean - xhat * mean2) * rstd
    dxhat -= xhat * mean_dxhat_xhat
    if dxhat.dtype == dx.dtype:
        xp.multiply(dxhat, rstd, out=dx)
    else:
        dxhat *= rstd
        dx[...] = dxhat  # (N, C), back to the compute dtype


def layernorm_backward_weight(
    dout: Array, cache: tuple[Array, Array], dg: Array, db: Array
) -> None:
    xhat, _ = cache
    c = dout.shape[-1]
    add_into(dg, widen(dout * xhat).reshape(-1, c).sum(axis=0).astype(dg.dtype, copy=False))
    add_into(db, widen(dout).reshape(-1, c).sum(axis=0).astype(db.dtype, copy=False))  # (C,)
