"""GELU, tanh approximation (GPT-2's)."""

from __future__ import annotations

import math

from mpipipe.xp import Array, namespace_of

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_forward(x: Array) -> tuple[Array, tuple[Array, Array]]:
    xp = namespace_of(x)
    t = xp.tanh(_K * (x + _A * x * x * x))  # (...)
    out = 0.5 * x * (1.0 + t)  # (...)
    return out, (x, t)


def gelu_backward_input(dout: Array, cache: tuple[Array, Array]) -> Array:
    x, t = cache
    dt_dx = (1.0 - t * t) * _K * (1.0 + 3.0 * _A * x * x)  # (...)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * dt_dx)  # (...)
