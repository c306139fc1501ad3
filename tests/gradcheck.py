"""Finite-difference gradient checks for layers, in float64."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numeric_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f() with respect to every element of x (in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-12))


def check_layer(layer, x: np.ndarray, seed: int = 0, tol: float = 1e-6) -> dict[str, float]:
    """Check backward_input (if x is float) and backward_weight of `layer` at input x against
    finite differences of L = sum(forward(x) * R) for a fixed random R. Returns the errors."""
    y, _ = layer.forward(x)
    r = np.random.default_rng(seed).normal(size=y.shape)

    def loss() -> float:
        out, _ = layer.forward(x)
        return float((out * r).sum())

    _, ctx = layer.forward(x)
    dx, wctx = layer.backward_input(r, ctx)
    for g in layer.grads.values():
        g.fill(0)
    layer.backward_weight(wctx)
    errors = {}
    if np.issubdtype(x.dtype, np.floating):
        errors["input"] = rel_error(dx, numeric_grad(loss, x))
    for name, p in layer.params.items():
        errors[name] = rel_error(layer.grads[name], numeric_grad(loss, p))
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"{type(layer).__name__}: relative errors above {tol}: {bad}"
    return errors
