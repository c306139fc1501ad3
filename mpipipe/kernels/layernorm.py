"""Layer normalisation over the last dimension (llm.c's derivation, term by term)."""

from __future__ import annotations

from mpipipe.xp import Array, namespace_of

EPS = 1e-5


def layernorm_forward(x: Array, g: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    # x (..., C)  g (C,)  b (C,)
    xp = namespace_of(x)
    c = x.shape[-1]
    xhat = x - x.mean(axis=-1, keepdims=True)  # (..., C), centred
    var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / c  # (..., 1), no temporary
    rstd = 1.0 / (var + EPS) ** 0.5  # (..., 1)
    xhat *= rstd  # (..., C), normalised in place
    out = xhat * g  # (..., C)
    out += b
    return out, (xhat, rstd)


def layernorm_backward_input(dout: Array, cache: tuple[Array, Array], g: Array) -> Array:
    xhat, rstd = cache
    xp = namespace_of(dout)
    c = dout.shape[-1]
    dxhat = dout * g  # (..., C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dxhat_xhat = xp.einsum("...i,...i->...", dxhat, xhat)[..., None] / c  # (..., 1)
    dxhat -= mean_dxhat  # in place from here on: dx = (dxhat - mean - xhat * mean2) * rstd
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return dxhat  # (..., C)


def layernorm_backward_weight(
    dout: Array, cache: tuple[Array, Array], dg: Array, db: Array
) -> None:
    xhat, _ = cache
    c = dout.shape[-1]
    dg += (dout * xhat).reshape(-1, c).sum(axis=0)  # (C,)
    db += dout.reshape(-1, c).sum(axis=0)  # (C,)
