"""Optimizers and the learning-rate schedule against closed forms, at several points of the curve
(not only its ends), for every optimizer and every kind of parameter.

Weight decay, as mpipipe/optim.py defines it: matrices decay (linear weights and both
embeddings, wte and wpe), vectors do not (biases, LayerNorm gains and shifts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipipe import optim
from mpipipe.config import TrainConfig
from mpipipe.layers import Init
from mpipipe.model import gpt


# -- learning rate -----------------------------------------------------------------------------
def cosine(step: int, base: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up reaching `base` at step warmup - 1, then cosine from `base` at step
    `warmup` down to floor * base at step `total`, flat after."""
    if step < warmup:
        return base * (step + 1) / warmup
    x = min(1.0, (step - warmup) / (total - warmup))
    return base * (floor + (1 - floor) * (1 + math.cos(math.pi * x)) / 2)


@pytest.mark.parametrize(
    "step, want",
    [
        (0, 0.3),  # warm-up: (step + 1) / warmup of the base
        (1, 0.6),
        (4, 1.5),
        (9, 3.0),
        (10, 3.0),  # the cosine starts at the base
        (35, 3.0 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)),
        (60, 3.0 * 0.55),  # half way: the mean of base and floor
        (61, 3.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * 51 / 100)) / 2)),
        (85, 3.0 * (0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2)),
        (109, 3.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * 99 / 100)) / 2)),
        (110, 0.3),  # the floor at the last step
        (500, 0.3),  # and after it
    ],
)
def test_lr_warmup_then_cosine_at_many_points(step, want):
    assert optim.lr_at(step, 3.0, warmup=10, total=110, min_ratio=0.1) == pytest.approx(
        want, rel=1e-12
    )


def test_lr_whole_curve_and_edge_cases():
    for warmup, total, floor in [(10, 110, 0.1), (3, 20, 0.0), (0, 7, 0.5), (1, 2, 0.25)]:
        got = [optim.lr_at(s, 2.0, warmup, total, floor) for s in range(total + 3)]
        want = [cosine(s, 2.0, warmup, total, floor) for s in range(total + 3)]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert optim.lr_at(0, 1.0, 5, 5) == 0.2 and optim.lr_at(5, 1.0, 5, 5) == 1.0  # no decay span
    assert optim.lr_at(3, 1.0, 0, 3, 0.0) == pytest.approx(0.0, abs=1e-15)


def test_lr_default_floor_is_a_tenth():
    assert optim.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1, rel=1e-12)


# -- which parameters decay --------------------------------------------------------------------
def test_matrices_and_embeddings_decay_vectors_do_not():
    model = gpt(1, 8, 2, 4, vocab=16)
    params = {}
    for i, spec in enumerate(model.layers):
        layer = spec.build(Init.for_layer(0, i, np.float64, np))
        params.update({f"{spec.name}.{k}": v for k, v in layer.params.items()})
    decayed = sorted(k for k, p in params.items() if optim.decays(k, p))
    assert decayed == [
        "block0.attn.attn.proj.w",
        "block0.attn.attn.qkv.w",
        "block0.mlp.mlp.fc.w",
        "block0.mlp.mlp.proj.w",
        "embed.wpe",
        "embed.wte",
        "head.lm_head.w",
    ]
    assert all(p.ndim == 1 for k, p in params.items() if k not in decayed)


KINDS = {"matrix": (3, 2), "vector": (3,), "embedding": (5, 4)}


# -- SGD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_sgd_constant_gradient_closed_form(kind, steps):
    """With g constant: buf_t = g (1 - mu^t) / (1 - mu), and p_T = d^T p_0 - lr sum_t d^(T-t)
    buf_t, where d = 1 - lr * wd for matrices and embeddings, 1 for vectors."""
    rng = np.random.default_rng(1)
    p0, g = rng.normal(size=KINDS[kind]), rng.normal(size=KINDS[kind])
    lr, mu, wd = 0.05, 0.8, 0.3
    params = {"x": p0.copy()}
    opt = optim.SGD(params, momentum=mu, weight_decay=wd)
    for _ in range(steps):
        opt.step({"x": g.copy()}, lr)
    d = 1.0 if kind == "vector" else 1 - lr * wd
    want = d**steps * p0 - lr * sum(
        d ** (steps - t) * g * (1 - mu**t) / (1 - mu) for t in range(1, steps + 1)
    )
    np.testing.assert_allclose(params["x"], want, rtol=1e-12, atol=1e-14)
    assert opt.state_dict()[1]["momentum"]["x"] == pytest.approx(g * (1 - mu**steps) / (1 - mu))


def test_sgd_clip_factor_scales_the_gradient_before_momentum():
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    opt = optim.SGD(params, momentum=0.5, weight_decay=0.0)
    opt.step({"w": np.full((2, 2), 4.0), "b": np.full(2, 4.0)}, lr=0.1, factor=0.25)
    opt.step({"w": np.full((2, 2), 4.0), "b": np.full(2, 4.0)}, lr=0.1, factor=1.0)
    # buffers: 1, then 0.5 + 4 = 4.5
    np.testing.assert_allclose(params["w"], 1 - 0.1 * 1 - 0.1 * 4.5, rtol=1e-14)
    np.testing.assert_allclose(params["b"], 1 - 0.1 * 1 - 0.1 * 4.5, rtol=1e-14)


# -- AdamW ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_adamw_constant_gradient_closed_form(kind, steps):
    """With g constant, bias correction makes m_hat = g and v_hat = g^2 at every step, so each
    update is lr * g / (|g| + eps): p_T = d^T p_0 - lr * s * sum_t d^(T-t), s = g / (|g| + eps);
    d = 1 - lr * wd for matrices and embeddings, 1 for vectors."""
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=KINDS[kind])
    g = rng.normal(size=KINDS[kind]) * np.logspace(-9, 0, p0.size).reshape(p0.shape)
    lr, wd, eps = 0.01, 0.2, 1e-8
    params = {"x": p0.copy()}
    opt = optim.AdamW(params, betas=(0.8, 0.9), eps=eps, weight_decay=wd)
    for _ in range(steps):
        opt.step({"x": g.copy()}, lr)
    d = 1.0 if kind == "vector" else 1 - lr * wd
    s = g / (np.abs(g) + eps)
    want = d**steps * p0 - lr * s * sum(d ** (steps - t) for t in range(1, steps + 1))
    np.testing.assert_allclose(params["x"], want, rtol=1e-9, atol=1e-15)
    t, slots = opt.state_dict()
    assert t == steps
    np.testing.assert_allclose(slots["m"]["x"], g * (1 - 0.8**steps), rtol=1e-12)
    np.testing.assert_allclose(slots["v"]["x"], g * g * (1 - 0.9**steps), rtol=1e-12)


def test_adamw_tiny_gradient_is_damped_by_eps():
    """g = eps: the first update is lr * eps / (eps + eps) = lr / 2 (eps outside the root)."""
    params = {"b": np.zeros(2)}
    opt = optim.AdamW(params, eps=1e-6, weight_decay=0.0)
    opt.step({"b": np.full(2, 1e-6)}, lr=0.1)
    np.testing.assert_allclose(params["b"], -0.05, rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_adamw_varying_gradients_lr_and_clipping(kind):
    """A changing gradient, learning rate and clip factor against the formula step by step."""
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=KINDS[kind])
    params = {"x": p0.copy()}
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    opt = optim.AdamW(params, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = v = np.zeros_like(p0)
    ref = p0.copy()
    for t in range(1, 6):
        g, lr, factor = rng.normal(size=p0.shape), 0.01 * t, (1.0, 0.5, 1.0, 0.25, 0.9)[t - 1]
        opt.step({"x": g.copy()}, lr, factor)
        g = g * factor
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if kind != "vector":
            ref = ref * (1 - lr * wd)
        ref = ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(params["x"], ref, rtol=1e-12)


def test_adamw_resumes_its_bias_correction_from_the_step_count():
    rng = np.random.default_rng(4)
    grads = [rng.normal(size=(2, 3)) for _ in range(4)]
    a = {"w": np.ones((2, 3))}
    run = optim.AdamW(a)
    for g in grads:
        run.step({"w": g.copy()}, 0.01)
    b = {"w": np.ones((2, 3))}
    first = optim.AdamW(b)
    for g in grads[:2]:
        first.step({"w": g.copy()}, 0.01)
    t, slots = first.state_dict()
    resumed = optim.AdamW(b)
    for name, slot in slots.items():
        getattr(resumed, name)["w"][...] = slot["w"]
    optim.load_state(resumed, t, resumed.scalars())
    for g in grads[2:]:
        resumed.step({"w": g.copy()}, 0.01)
    assert resumed.t == 4
    np.testing.assert_array_equal(a["w"], b["w"])


# -- mixed precision and the factory -------------------------------------------------------------
def test_mixed_precision_steps_fp32_masters_with_unscaled_gradients():
    p16 = {"w": np.full((2, 2), 1.0, np.float16), "b": np.full(2, 1.0, np.float16)}
    opt = optim.MixedPrecision(p16, lambda p: optim.SGD(p, 0.0, 0.5), scale=8.0, interval=3)
    assert opt.loss_scale == 8.0
    opt.step({"w": np.full((2, 2), 16.0, np.float16), "b": np.full(2, 16.0, np.float16)}, 0.1, 0.5)
    # gradient 16 * 0.5 / 8 = 1; w decays by 1 - 0.1 * 0.5, b does not
    np.testing.assert_allclose(opt.master["w"], 0.95 - 0.1, rtol=1e-7)
    np.testing.assert_allclose(opt.master["b"], 1.0 - 0.1, rtol=1e-7)
    assert p16["w"].dtype == np.float16 and p16["w"][0, 0] == np.float16(0.85)


def test_dynamic_loss_scale_doubles_after_interval_and_halves_on_overflow():
    p16 = {"w": np.zeros((2, 2), np.float16)}
    opt = optim.MixedPrecision(p16, lambda p: optim.SGD(p), scale=4.0, interval=3)
    zero = {"w": np.zeros((2, 2), np.float16)}
    seen = []
    for _ in range(7):
        opt.step(zero, 0.1)
        seen.append(opt.loss_scale)
    assert seen == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]
    assert opt.overflowed() is True
    assert opt.scalars() == {"loss_scale": 8.0, "good_steps": 0, "skipped": 1}
    opt.step(zero, 0.1)
    opt.step(zero, 0.1)
    assert opt.loss_scale == 8.0  # the count of good steps restarted at the overflow
    opt.step(zero, 0.1)
    assert opt.loss_scale == 16.0
    restored = optim.MixedPrecision(
        {"w": np.zeros((2, 2), np.float16)}, lambda p: optim.SGD(p), 4.0, 3
    )
    restored.load_state(0, {"loss_scale": 32.0, "good_steps": 2, "skipped": 5})
    assert restored.scalars() == {"loss_scale": 32.0, "good_steps": 2, "skipped": 5}


def test_bf16_has_no_loss_scale_and_never_skips():
    p16 = {"w": np.zeros((2, 2), np.float32)}
    opt = optim.MixedPrecision(p16, lambda p: optim.SGD(p), scale=None)
    assert opt.loss_scale == 1.0 and opt.overflowed() is False and opt.scalars() == {}


@pytest.mark.parametrize("name, cls", [("sgd", optim.SGD), ("adamw", optim.AdamW)])
def test_make_passes_the_config_through(name, cls):
    params = {"w": np.zeros((2, 2), np.float32)}
    cfg = TrainConfig(optimizer=name, weight_decay=0.25, momentum=0.7)
    opt = optim.make(name, params, cfg)
    assert type(opt) is cls and opt.weight_decay == 0.25
    if name == "sgd":
        assert opt.momentum == 0.7
    mixed = optim.make(name, params, cfg.replace(dtype="fp16", loss_scale=64.0))
    assert isinstance(mixed, optim.MixedPrecision) and mixed.loss_scale == 64.0
    assert type(mixed.inner) is cls and mixed.inner.weight_decay == 0.25
    assert optim.make(name, params, cfg.replace(dtype="bf16")).scaling is False
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optim.make("lamb", params, cfg)


def test_clip_factor_closed_form():
    for norm, max_norm in [(2.0, 1.0), (10.0, 3.0), (1e-3, 1e-4)]:
        assert optim.clip_factor(norm, max_norm) == max_norm / (norm + 1e-6)
    assert optim.clip_factor(1.0, 1.0) == 1.0  # at the limit: no clipping
    assert optim.clip_factor(5.0, -1.0) == 1.0
