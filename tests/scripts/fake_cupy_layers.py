"""mpipipe's kernels and one-process training on the fake CuPy, bitwise against NumPy (float64).

Run with the fake first on the path: PYTHONPATH=tests/fakegpu:. python tests/scripts/...
"""

import io
import json

import cupy
import numpy as np
from cupy import _fake

from mpipipe import TrainConfig, train
from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.kernels.tiled_attention import tiled_attention_backward_input, tiled_attention_forward
from mpipipe.layers import Block, Embedding, Head, Init
from mpipipe.xp import get, gpu_count, namespace_of

B, T, C, H, V = 2, 8, 16, 2, 32
assert gpu_count() == 1 and get("cupy") is cupy, "mpipipe.xp did not pick up the fake CuPy"


def layers(xp):
    def init(i):
        return Init.for_layer(0, i, np.float64, xp)

    return [Embedding(init(0), V, C, T), Block(init(1), C, H, 2), Head(init(2), C, V)]


def run(xp):
    """Forward, loss, backward_input and backward_weight; every array on the host after."""
    rng = np.random.default_rng(1)
    tokens = xp.asarray(rng.integers(0, V, size=(B, T)))
    targets = xp.asarray(rng.integers(0, V, size=(B, T)))
    model = layers(xp)
    x, ctxs = tokens, []
    for layer in model:
        x, ctx = layer.forward(x)
        ctxs.append(ctx)
    assert namespace_of(x) is xp
    loss, dy = cross_entropy_forward_backward(x, targets, 0.5)
    for layer, ctx in zip(reversed(model), reversed(ctxs), strict=True):
        dy, wctx = layer.backward_input(dy, ctx)
        layer.backward_weight(wctx)
    grads = {f"{i}.{k}": g for i, layer in enumerate(model) for k, g in layer.grads.items()}
    host = cupy.asnumpy if xp is cupy else np.asarray
    return loss, {k: host(g) for k, g in grads.items()}


loss, grads = run(np)
_fake.reset()
fake_loss, fake_grads = run(cupy)
layer_counts = _fake.snapshot()
assert fake_loss == loss, (fake_loss, loss)
assert grads.keys() == fake_grads.keys()
for k, g in grads.items():
    assert np.array_equal(fake_grads[k], g), k

# the tiled attention core (the layers above use the dense one), several query and key tiles
qkv_h = np.random.default_rng(2).normal(size=(B, T + 1, 3 * C))
dout_h = np.random.default_rng(3).normal(size=(B, T + 1, C))
tiled = {}
for xp in (np, cupy):
    y, ctx = tiled_attention_forward(xp.asarray(qkv_h), H, 2, 3)
    dx = tiled_attention_backward_input(xp.asarray(dout_h), ctx, 2, 3)
    tiled[xp.__name__] = [cupy.asnumpy(a) if xp is cupy else a for a in (y, dx)]
for a, b in zip(tiled["numpy"], tiled["cupy"], strict=True):
    assert np.array_equal(a, b), "tiled attention on the fake differs from NumPy"

cfg = TrainConfig(
    layers=2, d_model=16, heads=2, seq_len=8, global_batch=4, microbatches=2, steps=2,
    eval_batches=1, peak_tflops=1.0,
)  # fmt: skip
ref = train(cfg.replace(backend="numpy", dtype="float64"), out=io.StringIO())
_fake.reset()
got = train(cfg.replace(backend="cupy", dtype="float64"), out=io.StringIO())
assert [r["loss"] for r in got.history] == [r["loss"] for r in ref.history]
for k, v in ref.params.items():
    assert np.array_equal(got.params[k], v), k
print("layers", json.dumps(layer_counts))
print("train", json.dumps(_fake.snapshot()))
print("bitwise equal")
