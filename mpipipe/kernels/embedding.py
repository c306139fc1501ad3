"""Token embedding plus learned positional embedding."""

from __future__ import annotations

from mpipipe.xp import Array, scatter_add, widen


def embedding_forward(tokens: Array, wte: Array, wpe: Array) -> tuple[Array, Array]:
    # tokens (B, T) int  wte (V, C)  wpe (Tmax, C)
    t = tokens.shape[1]
    out = wte[tokens] + wpe[:t]  # (B, T, C)
    return out, tokens


def embedding_backward_weight(dout: Array, tokens: Array, dwte: Array, dwpe: Array) -> None:
    b, t, c = dout.shape
    scatter_add(dwte, tokens.reshape(-1), dout.reshape(b * t, c))  # (V, C), float32 sums if 16-bit
    dwpe[:t] += widen(dout).sum(axis=0).astype(dwpe.dtype, copy=False)  # (T, C)
