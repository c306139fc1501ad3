"""Train a model you define in Python through the pipeline, without the CLI.

    python examples/custom_model.py                 # one process
    mpiexec -n 4 python examples/custom_model.py    # four pipeline stages

The model is a list of LayerSpecs (recipes: each stage builds only its own layers) over a layer
written here, `Scale`, and mpipipe's own Linear/GELU. The data is synthetic: which of 8 Gaussian
blobs a 16-dimensional point was drawn from.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np

from mpipipe import GELU, Init, LayerSpec, Linear, Model, Sequential, TrainConfig, train

D_IN, HIDDEN, CLASSES = 16, 64, 8


class Scale:
    """A layer of your own: y = x * s with a learned per-feature scale s (explicit backward)."""

    def __init__(self, init: Init, c: int) -> None:
        self.params = {"s": init.ones((c,))}
        self.grads = {"s": init.zeros((c,))}

    def forward(self, x):
        return x * self.params["s"], x  # (out, ctx)

    def backward_input(self, dy, ctx):
        return dy * self.params["s"], (dy, ctx)  # (dx, ctx for the weight gradient)

    def backward_weight(self, wctx):
        dy, x = wctx
        self.grads["s"] += (dy * x).reshape(-1, x.shape[-1]).sum(axis=0)


def hidden_block(init: Init) -> Sequential:
    return Sequential(
        [("fc", Linear(init, HIDDEN, HIDDEN)), ("act", GELU()), ("scale", Scale(init, HIDDEN))]
    )


model = Model(
    layers=[LayerSpec("in", partial(Linear, c_in=D_IN, c_out=HIDDEN, std=0.3))]
    + [LayerSpec(f"hidden{i}", hidden_block) for i in range(4)]
    + [LayerSpec("out", partial(Linear, c_in=HIDDEN, c_out=CLASSES, std=0.1))],
    act_shape=lambda i, b: (b, CLASSES) if i == 5 else (b, HIDDEN),
)


class Blobs:
    """Deterministic synthetic data: a pure function of (split, step)."""

    centers = np.random.default_rng(0).normal(scale=2.0, size=(CLASSES, D_IN))

    def batch(self, step: int, split: str, size: int, rows: range):
        """Rows `rows` of the global batch of `size` samples (a replica's slice)."""
        rng = np.random.default_rng([1 if split == "train" else 2, step])
        y = rng.integers(0, CLASSES, size=size)
        x = self.centers[y] + rng.normal(size=(size, D_IN))
        return x[rows].astype(np.float32), y[rows]


cfg = TrainConfig(
    global_batch=64,
    microbatches=4,
    steps=60,
    lr=1e-2,
    warmup=5,
    eval_every=20,
    log_every=20,
    schedule="1f1b",
)
result = train(cfg, model=model, dataset=Blobs())
first, last = result.history[0]["loss"], result.eval_losses[-1]
if last >= first:  # every rank knows the losses: they are all-reduced
    sys.exit(f"training did not reduce the loss: {first:.3f} -> {last:.3f}")
