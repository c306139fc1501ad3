"""GELU, tanh approximation (GPT-2's), with in-place arithmetic: a handful of passes over the
(..., 4C) activations and a temporary per block instead of one temporary per operator.

float32 and float64: 0.5 x (1 + tanh z) is computed as x s with s = 1 / (1 + exp(-2z)) (the same
function: 0.5 (1 + tanh z) is the logistic of 2z), and s is what the backward pass keeps: NumPy's
float32 exp takes half the time of its tanh, and the formula needs fewer passes both ways
(forward 9, backward 10, against 10 and 12): 9.5 against 14 ms forward and 5.4-6.0 against
6.9-7.2 ms backward on 2 Mi float32 elements, one thread. exp(-2z) overflows to inf for x below
about -9.3 in float32; 1 / (1 + inf) is then 0, the limit (NumPy's overflow warning is silenced
for that one call).

16-bit (fp16, bf16) keeps the tanh form and keeps t = tanh z: the backward's s (1 - s) would be
s - s^2 of an s rounded to 8 bits near 1, twice the error of the tanh form's 1 - t^2 (the bf16
block test's 8-ulp bound caught it). The results have the input's dtype (NumPy promotes bfloat16
with a Python float to float32: `t + 1.0` is float32 until it is written into the output).
Both passes run over blocks of rows on the rank's cores (`rowwise.each_rows`), writing each
block's results straight into the output arrays."""

from __future__ import annotations

import math

from mpipipe.rowwise import each_rows
from mpipipe.xp import Array, is_half, namespace_of, overflow_to_inf

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_forward(x: Array) -> tuple[Array, tuple[Array, Array]]:
    xp = namespace_of(x)
    out, kept = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)  # C order: filled
    forward = _forward_tanh if is_half(x.dtype) else _forward
    each_rows(forward, *(a.reshape(-1, x.shape[-1]) for a in (x, out, kept)))
    return out, (x, kept)


def gelu_backward_input(dout: Array, cache: tuple[Array, Array]) -> Array:
    x, kept = cache
    xp = namespace_of(x)
    dx = xp.empty(dout.shape, dout.dtype)  # C order: its rows are views
    backward = _backward_tanh if is_half(x.dtype) else _backward
    each_rows(backward, *(a.reshape(-1, x.shape[-1]) for a in (dout, x, kept, dx)))
    return dx


def _forward(x: Array, out: Array, s: Array) -> None:
    xp = namespace_of(x)
    xp.multiply(x, x, out=s)
    s *= _A
    s *= x
    s += x  # z / K = x + A x^3
    s *= -2.0 * _K  # -2z
    with overflow_to_inf(xp):
        xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)  # s = 1 / (1 + exp(-2z)) = 0.5 (1 + tanh z)
    xp.multiply(x, s, out=out)


def _backward(dout: Array, x: Array, s: Array, g: Array) -> None:
    # d/dx (x s) = s + x s (1 - s) 2K (1 + 3 A x^2)
    xp = namespace_of(x)
    u = x * x  # (...), a block's temporary
    u *= 3.0 * _A
    u += 1.0
    u *= -2.0 * _K  # -2K (1 + 3 A x^2)
    xp.multiply(s, s, out=g)
    g -= s  # -s (1 - s)
    g *= u  # s (1 - s) 2K (1 + 3 A x^2)
    g *= x
    g += s
    g *= dout


def _forward_tanh(x: Array, out: Array, t: Array) -> None:
    xp = namespace_of(x)
    xp.multiply(x, x, out=t)
    t *= _A
    t *= x
    t += x  # x + A x^3
    t *= _K
    xp.tanh(t, out=t)  # tanh(K (x + A x^3))
    y = t + 1.0  # (...), a block's temporary (float32 for bf16)
    y *= x
    y *= 0.5  # 0.5 x (1 + t)
    out[...] = y


def _backward_tanh(dout: Array, x: Array, t: Array, g: Array) -> None:
    # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) K (1 + 3 A x^2)
    xp = namespace_of(x)
    u = x * x  # (...), a block's temporary
    u *= 3.0 * _A
    u += 1.0
    u *= _K  # K (1 + 3 A x^2)
    xp.multiply(t, t, out=g)
    g -= 1.0
    g *= u  # -(1 - t^2) K (1 + 3 A x^2)
    g *= x
    g -= t
    g -= 1.0  # -(1 + t + x dt/dx)
    g *= -0.5
    g *= dout
