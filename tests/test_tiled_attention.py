"""The tiled (FlashAttention-2) attention core against the dense reference and finite
differences, in float64; its saved context is O(T); a training run agrees with dense."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mpipipe import TrainConfig, train
from mpipipe.kernels.attention import attention_backward_input, attention_forward
from mpipipe.kernels.tiled_attention import (
    tiled_attention_backward_input,
    tiled_attention_forward,
)
from mpipipe.layers import Attention, Init
from mpipipe.memory import activation_elements
from tests.gradcheck import numeric_grad, rel_error

# (B, T, H, D, tile, kv_tile): one tile; tiles that do not divide T; key tiles wider and
# narrower than query tiles; several key tiles left of the diagonal
SHAPES = [
    (2, 5, 2, 3, 128, 512),
    (2, 5, 2, 3, 2, 2),
    (1, 7, 3, 4, 2, 3),
    (2, 9, 2, 4, 4, 2),
    (1, 17, 2, 4, 4, 8),
]


def qkv_and_dout(b, t, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, t, 3 * h * d)), rng.normal(size=(b, t, h * d))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}D{}-tile{}-kv{}".format(*s))
def test_tiled_equals_dense_float64(shape):
    b, t, h, d, tile, kv = shape
    qkv, dout = qkv_and_dout(b, t, h, d)
    y_ref, ctx_ref = attention_forward(qkv, h)
    y, ctx = tiled_attention_forward(qkv, h, tile, kv)
    assert y.dtype == np.float64 and y.shape == y_ref.shape
    assert rel_error(y, y_ref) < 1e-13  # the summation order differs: rounding only
    dx_ref = attention_backward_input(dout, ctx_ref)
    dx = tiled_attention_backward_input(dout, ctx, tile, kv)
    assert dx.shape == qkv.shape and rel_error(dx, dx_ref) < 1e-13


@pytest.mark.parametrize("tiles", [(2, 3), (128, 512)])
def test_tiled_gradient_against_finite_differences(tiles):
    b, t, h, d = 1, 7, 2, 2
    qkv, r = qkv_and_dout(b, t, h, d, seed=1)

    def loss():
        return float((tiled_attention_forward(qkv, h, *tiles)[0] * r).sum())

    _, ctx = tiled_attention_forward(qkv, h, *tiles)
    dx = tiled_attention_backward_input(r, ctx, *tiles)
    assert rel_error(dx, numeric_grad(loss, qkv)) < 1e-7


def test_tiled_is_causal_and_keeps_no_t_by_t_array():
    b, t, h, d = 1, 64, 2, 4
    qkv, _ = qkv_and_dout(b, t, h, d, seed=2)
    y, ctx = tiled_attention_forward(qkv, h, 16, 32)
    qkv2 = qkv.copy()
    qkv2[:, -1] += 1.0  # change only the last position
    y2, _ = tiled_attention_forward(qkv2, h, 16, 32)
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    assert not np.allclose(y[:, -1], y2[:, -1])
    # saved: q, k, v, the output (B, T, C each) and one logsumexp per row; nothing (T, T)
    assert sum(a.size for a in ctx) == 4 * b * t * h * d + b * h * t


def test_selective_recomputation_leaves_the_tiled_layer_unchanged():
    x = np.random.default_rng(3).normal(size=(2, 6, 8))
    layer = Attention(Init.for_layer(0, 0, np.float64, np), 8, 2, kernel="tiled")
    y, ctx = layer.forward(x)
    layer.recompute_selectively()
    y2, ctx2 = layer.forward(x)
    np.testing.assert_array_equal(y, y2)
    dy = np.ones_like(y)
    np.testing.assert_array_equal(
        layer.backward_input(dy, ctx)[0], layer.backward_input(dy, ctx2)[0]
    )


def test_unknown_kernel_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose tiled or dense"):
        Attention(Init.for_layer(0, 0, np.float64, np), 8, 2, kernel="flash")


def test_training_with_tiled_attention_equals_dense_to_rounding():
    """Four float64 steps of a small GPT: the losses of the two kernels agree to 1e-12 relative
    (rounding, accumulated over the steps, bounds the difference: the tiled kernel sums tile by
    tile)."""
    base = dict(
        layers=2, d_model=16, heads=2, seq_len=16, global_batch=4, microbatches=2, steps=4,
        eval_every=0, eval_batches=1, dtype="float64", peak_tflops=1.0,
    )  # fmt: skip
    losses = {}
    for kernel in ("dense", "tiled"):
        result = train(TrainConfig(**base, attention=kernel), out=io.StringIO())
        losses[kernel] = np.array([r["loss"] for r in result.history])
    assert losses["dense"][-1] < losses["dense"][0]  # it trained
    np.testing.assert_allclose(losses["tiled"], losses["dense"], rtol=1e-12, atol=0)


def test_memory_estimate_counts_a_logsumexp_per_row_for_tiled():
    meta = {"kind": "gpt", "seq_len": 64, "d_model": 16, "n_head": 2, "vocab": 32}
    dense = activation_elements("block0", {**meta, "attention": "dense"}, b=3)
    tiled = activation_elements("block0", {**meta, "attention": "tiled"}, b=3)
    assert dense - tiled == 3 * 2 * (64 * 64 - 64)  # b H (T^2 - T)


def test_a_checkpoint_of_either_attention_kernel_loads_with_the_other(tmp_path):
    """--attention names how the core computes, not what the model holds: the checkpoint's
    model check ignores it (and still refuses another model)."""
    from mpipipe.checkpoint.base import CheckpointError
    from mpipipe.checkpoint.read import check_model
    from mpipipe.model import gpt

    tiled, dense = gpt(2, 16, 2, 8, attention="tiled"), gpt(2, 16, 2, 8)
    saved = {"model": {"meta": tiled.meta, "layers": [s.name for s in tiled.layers]}}
    check_model(tmp_path, saved, dense)  # no error
    with pytest.raises(CheckpointError, match="--layers"):
        check_model(tmp_path, saved, gpt(3, 16, 2, 8))
