"""Measure each layer's cost on this machine, for `--partition time`.

Layers built from the same recipe (the transformer blocks) cost the same, so each distinct
recipe is built and timed once (forward, backward_input, backward_weight on one micro-batch;
the last layer's time includes the loss), then the layers are thrown away. Rank 0 measures on
its own device, with the backend's clock (CUDA events on a GPU), and broadcasts, so every rank
splits the model the same way.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.layers import Init
from mpipipe.model import Model
from mpipipe.xp import best_seconds


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
    if model.input_example is None:
        raise ValueError(
            "--partition time needs the model's input_example (built-in models "
            "have one; give your Model one, or use --partition params/uniform)"
        )
    rng = np.random.default_rng(0)
    last = len(model.layers) - 1
    known: dict[Any, float] = {}
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
            targets = None
            if i == last:
                shape = model.act_shape(i, micro_batch)
                targets = xp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))

            def work(layer: Any = layer, x: Any = x, targets: Any = targets) -> None:
                y, ctx = layer.forward(x)
                if targets is not None:
                    _, dy = cross_entropy_forward_backward(y, targets, 1.0)
                else:
                    dy = xp.ones_like(y)
                _, wctx = layer.backward_input(dy, ctx)
                layer.backward_weight(wctx)

            known[key], clock = best_seconds(xp, work, repeats)
        times.append(known[key])
    return times, clock
