"""Measure each layer's cost on this machine, for `--partition time`.

Layers built from the same recipe (the transformer blocks) cost the same, so each distinct
recipe is built and timed once (forward, backward_input, backward_weight on one micro-batch;
the last layer's time includes the loss), then the layers are thrown away. Rank 0 measures and
broadcasts, so every rank splits the model the same way.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.layers import Init
from mpipipe.model import Model


def _recipe(spec: Any) -> Any:
    f = spec.factory
    if hasattr(f, "func"):  # functools.partial: same function and arguments = same layer shape
        return (f.func, f.args, tuple(sorted(f.keywords.items())), spec.body)
    return id(spec)


def layer_times(model: Model, micro_batch: int, dtype: Any, repeats: int = 3) -> list[float]:
    """Seconds of F + B + W per global layer for one micro-batch (best of `repeats`)."""
    if model.input_example is None:
        raise ValueError(
            "--partition time needs the model's input_example (built-in models "
            "have one; give your Model one, or use --partition params/uniform)"
        )
    rng = np.random.default_rng(0)
    last = len(model.layers) - 1
    known: dict[Any, float] = {}
    times = []
    for i, spec in enumerate(model.layers):
        key = (_recipe(spec), i == 0, i == last)
        if key not in known:
            layer = spec.build(Init.for_layer(0, i, dtype, np))
            if i == 0:
                x = model.input_example(micro_batch)
            else:
                x = rng.normal(size=model.act_shape(i - 1, micro_batch)).astype(dtype)
            best = float("inf")
            for _ in range(repeats + 1):  # the first round warms up
                t0 = time.perf_counter()
                y, ctx = layer.forward(x)
                if i == last:
                    targets = rng.integers(0, y.shape[-1], size=y.shape[:-1])
                    _, dy = cross_entropy_forward_backward(y, targets, 1.0)
                else:
                    dy = np.ones_like(y)
                _, wctx = layer.backward_input(dy, ctx)
                layer.backward_weight(wctx)
                best = min(best, time.perf_counter() - t0)
            known[key] = best
        times.append(known[key])
    return times
