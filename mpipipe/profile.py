"""Measure each layer's cost on this machine, for `--partition time` and `--schedule auto`.

Layers built from the same recipe (the transformer blocks) cost the same, so each distinct
recipe is built and timed once (forward, backward_input, backward_weight on one micro-batch;
the last layer's forward includes the loss), then the layers are thrown away. Rank 0 measures
on its own device, with the backend's clock (CUDA events on a GPU), and broadcasts, so every
rank splits the model, and synthesizes the schedule, the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.layers import Init
from mpipipe.model import Model
from mpipipe.xp import seconds_each


def _recipe(spec: Any) -> Any:
    f = spec.factory
    if hasattr(f, "func"):  # functools.partial: same function and arguments = same layer shape
        return (f.func, f.args, tuple(sorted(f.keywords.items())), spec.body)
    return id(spec)


def layer_times(
    model: Model, micro_batch: int, dtype: Any, xp: ModuleType = np, repeats: int = 3
) -> tuple[list[float], str]:
    """Seconds of F + B + W per global layer for one micro-batch (best of `repeats`), and the
    clock that timed them (CUDA events or perf_counter)."""
    times, clock = action_times(model, micro_batch, dtype, xp, repeats)
    return [sum(t) for t in times], clock


def action_times(
    model: Model, micro_batch: int, dtype: Any, xp: ModuleType = np, repeats: int = 3
) -> tuple[list[tuple[float, float, float]], str]:
    """Seconds of (F, B, W) per global layer for one micro-batch, and the clock. Each round runs
    F, then B on what that F saved, then W (kernels may reuse saved arrays in place), and each
    part keeps its best time over `repeats` rounds. The last layer's F includes the loss and its
    gradient, as the executor runs them."""
    if model.input_example is None:
        raise ValueError(
            "timing layers needs the model's input_example (built-in models have one; give "
            "your Model one, or use --partition params/uniform and costs you give)"
        )
    rng = np.random.default_rng(0)
    last = len(model.layers) - 1
    known: dict[Any, tuple[float, float, float]] = {}
    clock = "perf_counter"
    times = []
    for i, spec in enumerate(model.layers):
        key = (_recipe(spec), i == 0, i == last)
        if key not in known:
            layer = spec.build(Init.for_layer(0, i, dtype, xp))
            if i == 0:
                x = xp.asarray(model.input_example(micro_batch))
            else:
                x = xp.asarray(rng.normal(size=model.act_shape(i - 1, micro_batch)).astype(dtype))
            loss = None
            if i == last:
                shape = model.act_shape(i, micro_batch)
                targets = xp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))
                loss = lambda y, t=targets: cross_entropy_forward_backward(y, t, 1.0)[1]  # noqa: E731
            known[key], clock = time_layer(layer, x, loss, xp, repeats)
        times.append(known[key])
    return times, clock


def time_layer(
    layer: Any,
    x: Any,
    loss: Callable[[Any], Any] | None,
    xp: ModuleType = np,
    repeats: int = 3,
    summary: Callable[[list[float]], float] = min,
) -> tuple[tuple[float, float, float], str]:
    """Seconds of the layer's F (with `loss`, which maps its output to the output gradient, as
    the last stage's F does), B on what that F saved and W, each `summary`-ised (the best by
    default) over `repeats` rounds of F, B, W after a warm-up round; and the clock."""
    held: dict[str, Any] = {}

    def forward() -> None:
        y, held["ctx"] = layer.forward(x)
        held["dy"] = loss(y) if loss is not None else xp.ones_like(y)

    def backward() -> None:
        _, held["wctx"] = layer.backward_input(held["dy"], held["ctx"])

    def weight() -> None:
        layer.backward_weight(held["wctx"])

    (f, b, w), clock = seconds_each(xp, [forward, backward, weight], repeats, summary)
    return (f, b, w), clock
