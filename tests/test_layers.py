"""Every layer's backward_input and backward_weight against finite differences, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from mpipipe.kernels.loss import cross_entropy_forward, cross_entropy_forward_backward
from mpipipe.layers import (
    GELU,
    MLP,
    Attention,
    Block,
    Embedding,
    Head,
    Init,
    LayerNorm,
    Linear,
    Residual,
)
from mpipipe.tied import TiedHead
from tests.gradcheck import check_layer, numeric_grad, rel_error

B, T, C, H, V = 2, 5, 8, 2, 11


def init(dtype=np.float64, seed=0):
    return Init.for_layer(seed, 0, dtype, np)


def x_float(shape=(B, T, C), seed=1):
    return np.random.default_rng(seed).normal(size=shape)


def perturb(layer, seed=2):
    """Non-trivial parameters (LayerNorm starts at g=1, b=0; biases at 0)."""
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p += 0.3 * rng.normal(size=p.shape)
    return layer


LAYERS = {
    "linear": lambda dt: Linear(init(dt), C, 7),
    "linear_nobias": lambda dt: Linear(init(dt), C, 7, bias=False),
    "layernorm": lambda dt: LayerNorm(init(dt), C),
    "gelu": lambda dt: GELU(),
    "attention": lambda dt: Attention(init(dt), C, H),  # dense
    "attention_tiled": lambda dt: Attention(init(dt), C, H, kernel="tiled"),
    "mlp": lambda dt: MLP(init(dt), C),
    "residual": lambda dt: Residual(
        [("ln", LayerNorm(init(dt), C)), ("fc", Linear(init(dt), C, C))]
    ),
    "block": lambda dt: Block(init(dt), C, H, n_layer=2),
    "head": lambda dt: Head(init(dt), C, V),
    "tied_head": lambda dt: TiedHead(init(dt), C, V),  # logits against a (V, C) weight
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradients_float64(name):
    errors = check_layer(perturb(LAYERS[name](np.float64)), x_float())
    assert errors  # at least the input gradient was compared


def test_embedding_gradients_float64():
    layer = perturb(Embedding(init(), V, C, max_len=T + 3))
    tokens = np.array([[1, 3, 3, 0, 10], [3, 3, 2, 1, 1]])  # repeated tokens accumulate
    errors = check_layer(layer, tokens)
    assert set(errors) == {"wte", "wpe"}


def test_attention_is_causal():
    layer = perturb(Attention(init(), C, H))
    x = x_float()
    y, _ = layer.forward(x)
    x2 = x.copy()
    x2[:, -1] += 1.0  # change only the last position
    y2, _ = layer.forward(x2)
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    assert not np.allclose(y[:, -1], y2[:, -1])


def test_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    loss, dlogits = cross_entropy_forward_backward(logits.copy(), targets, scale=0.5)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -np.log(np.take_along_axis(p, targets[..., None], -1)).mean()
    assert loss == pytest.approx(expected, rel=1e-12)
    assert cross_entropy_forward(logits, targets) == pytest.approx(expected, rel=1e-12)
    numeric = numeric_grad(lambda: 0.5 * cross_entropy_forward(logits, targets), logits)
    assert rel_error(dlogits, numeric) < 1e-6


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float32_matches_float64(name):
    """The same layer built in float32 computes in float32, to float32 accuracy."""
    l64, l32 = perturb(LAYERS[name](np.float64)), LAYERS[name](np.float32)
    for k, p in l64.params.items():
        l32.params[k][...] = p  # in place: composite layers share these arrays with children
    x = x_float()
    y64, _ = l64.forward(x)
    y32, ctx = l32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=2e-4, atol=2e-5)
    dx, wctx = l32.backward_input(np.ones_like(y32), ctx)
    l32.backward_weight(wctx)
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in l32.grads.values())


def test_init_depends_only_on_seed_and_index():
    a = Block(Init.for_layer(7, 3, np.float32, np), C, H, 2)
    b = Block(Init.for_layer(7, 3, np.float32, np), C, H, 2)
    c = Block(Init.for_layer(7, 4, np.float32, np), C, H, 2)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["attn.attn.qkv.w"], c.params["attn.attn.qkv.w"])


def whole_attention(qkv, dout, h):
    """The causal attention core and its input gradient by whole-matrix formulas, in float64."""
    from mpipipe.kernels import attention

    qkv, dout = qkv.astype(np.float64), dout.astype(np.float64)
    b, t, c3 = qkv.shape
    d = c3 // (3 * h)
    q, k, v = qkv.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + attention.causal_mask(np, t, q.dtype)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    dy = dout.reshape(b, t, h, d).transpose(0, 2, 1, 3)
    dp = dy @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / np.sqrt(d)
    dqkv = np.stack([ds @ k, ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ dy])
    return out, dqkv.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * h * d)


@pytest.mark.parametrize("t", [192, 194])
def test_banded_attention_products_equal_the_whole_ones(t):
    """From T = 192 the dense attention's six products run band by band over the unmasked keys
    only (kernels/attention.py): forward output and input gradient equal the whole-matrix
    formulas to float64 rounding (T = 194: bands of unequal height), and recomputing the scores
    (selective recomputation) changes no bit."""
    from mpipipe.kernels import attention

    b, h, d = 2, 3, 8
    rng = np.random.default_rng(1)
    qkv, dout = rng.normal(size=(b, t, 3 * h * d)), rng.normal(size=(b, t, h * d))
    ref, dref = whole_attention(qkv, dout, h)
    out, cache = attention.attention_forward(qkv, h)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    dqkv = attention.attention_backward_input(dout, cache)
    np.testing.assert_allclose(dqkv, dref, rtol=1e-11, atol=1e-13)
    _, dropped = attention.attention_forward(qkv, h, keep_scores=False)
    np.testing.assert_array_equal(attention.attention_backward_input(dout, dropped), dqkv)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_banded_attention_in_every_dtype(dtype):
    """float32 and the 16-bit dtypes (whose products reach the float32 scores through a cast,
    `attention._product`) against the float64 whole-matrix formulas on the same inputs, to
    their precision (seen: float32 7.6e-7, float16 6.8e-4, bfloat16 3.2e-3 of the largest)."""
    from mpipipe.kernels import attention

    if dtype == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    b, h, d, t = 2, 2, 16, 194
    rng = np.random.default_rng(2)
    qkv = rng.normal(size=(b, t, 3 * h * d)).astype(dtype)
    dout = rng.normal(size=(b, t, h * d)).astype(dtype)
    out, cache = attention.attention_forward(qkv, h)
    dqkv = attention.attention_backward_input(dout, cache)
    assert out.dtype == dqkv.dtype == np.dtype(dtype)
    tol = {"float32": 1e-5, "float16": 4e-3}.get(str(dtype), 2e-2)
    for got, want in zip((out, dqkv), whole_attention(qkv, dout, h), strict=True):
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= tol * np.abs(want).max(), (err, np.abs(want).max())


@pytest.mark.parametrize("t", [192, 194])
def test_banded_causal_softmax_equals_the_whole_rows(t):
    """From T = 192 the causal softmax and its backward work in bands of query rows over the
    unmasked columns only (kernels/attention.py): the same as the whole rows to float64
    rounding, every masked entry exactly 0 (T = 194: bands of unequal height)."""
    from mpipipe.kernels import attention

    assert len(attention._bands(t)) == attention.BANDS
    rng = np.random.default_rng(0)
    x, d = rng.normal(size=(2, 3, t, t)), rng.normal(size=(2, 3, t, t))
    ref = x + attention.causal_mask(np, t, x.dtype)
    ref = np.exp(ref - ref.max(axis=-1, keepdims=True))
    ref /= ref.sum(axis=-1, keepdims=True)
    got = x.reshape(-1, t, t).copy()
    attention._causal_softmax(got)
    got = got.reshape(x.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-16)
    assert not got[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]].any()
    dref = ref * (d - (d * ref).sum(axis=-1, keepdims=True))
    dgot = d.reshape(-1, t, t).copy()
    attention._softmax_backward(dgot, got.reshape(-1, t, t))
    np.testing.assert_allclose(dgot.reshape(d.shape), dref, rtol=1e-12, atol=1e-15)
    assert not dgot.reshape(d.shape)[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]].any()
