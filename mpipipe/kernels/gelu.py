"""GELU, tanh approximation (GPT-2's), with in-place arithmetic: a handful of passes over the
(..., 4C) activations and two temporaries instead of one temporary per operator. The output is
cast to the input's dtype: NumPy promotes bfloat16 with a Python float to float32 (`t + 1.0`),
where CuPy and the builtin dtypes keep it; `astype(..., copy=False)` is a no-op for those.
Both passes run over blocks of rows on the rank's cores (`rowwise.map_rows`)."""

from __future__ import annotations

import math

from mpipipe.rowwise import map_rows
from mpipipe.xp import Array, namespace_of

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_forward(x: Array) -> tuple[Array, tuple[Array, Array]]:
    out, t = map_rows(_forward, x.reshape(-1, x.shape[-1]))  # (N, ...) each
    return out.reshape(x.shape), (x, t.reshape(x.shape))


def gelu_backward_input(dout: Array, cache: tuple[Array, Array]) -> Array:
    x, t = cache
    rows = (-1, x.shape[-1])
    return map_rows(_backward, dout.reshape(rows), x.reshape(rows), t.reshape(rows)).reshape(
        x.shape
    )


def _forward(x: Array) -> tuple[Array, Array]:
    xp = namespace_of(x)
    t = x * x  # (...)
    t *= _A
    t *= x
    t += x  # x + A x^3
    t *= _K
    xp.tanh(t, out=t)  # tanh(K (x + A x^3))
    out = t + 1.0  # (...)
    out *= x
    out *= 0.5  # 0.5 x (1 + t)
    return out.astype(x.dtype, copy=False), t


def _backward(dout: Array, x: Array, t: Array) -> Array:
    # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) K (1 + 3 A x^2)
    u = x * x  # (...)
    u *= 3.0 * _A
    u += 1.0
    u *= _K  # K (1 + 3 A x^2)
    s = t * t  # (...)
    s -= 1.0
    s *= u  # -(1 - t^2) K (1 + 3 A x^2)
    s *= x
    s -= t
    s -= 1.0  # -(1 + t + x dt/dx)
    s *= -0.5
    s *= dout
    return s
