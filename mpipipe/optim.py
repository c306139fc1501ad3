"""Optimizers (SGD with momentum, AdamW), fp16/bf16 mixed precision around either, the
learning-rate schedule, and clipping.

Every update is element-wise on one tensor, so a parameter's new value depends only on its own
gradient and state: the results are the same whichever stage holds it, and however its rows are
split over the rank's cores (`rowwise.each_rows`). All optimizers follow one
protocol (`Optimizer`), so the trainer and the checkpoints never ask which one they hold.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from functools import partial
from typing import Any, Protocol

from mpipipe.rowwise import each_rows
from mpipipe.xp import Array


class Optimizer(Protocol):
    """What the trainer and the checkpoints use of an optimizer."""

    loss_scale: float  # multiplies the loss gradient (1.0 but with dynamic loss scaling)

    def step(self, grads: dict[str, Array], lr: float, factor: float = 1.0) -> None:
        """Update with grads * factor (factor: gradient clipping)."""
        ...

    def overflowed(self) -> bool:
        """The gradients are not finite: True if this optimizer handles that by skipping the
        step (dynamic loss scaling), False if the run must stop."""
        ...

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        """(step count, {slot: {param name: array}}): what a checkpoint stores."""
        ...

    def scalars(self) -> dict[str, float]:
        """Small numbers a checkpoint stores besides the slots (may be empty)."""
        ...

    def load_state(self, t: int, scalars: dict[str, float] | None) -> None:
        """Restore the step count and scalars (the slot arrays are filled in place)."""
        ...


class _Plain:
    """What SGD and AdamW share: no loss scaling, clipping applied to the gradients."""

    loss_scale = 1.0
    t = 0

    def overflowed(self) -> bool:
        return False

    def scalars(self) -> dict[str, float]:
        return {}

    def load_state(self, t: int, scalars: dict[str, float] | None) -> None:
        self.t = t

    @staticmethod
    def _clip(grads: dict[str, Array], factor: float) -> None:
        if factor < 1.0:
            for g in grads.values():
                g *= factor


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def decays(name: str, p: Array) -> bool:
    """Weight decay applies to matrices (weights, embeddings), not to biases and norm gains."""
    return bool(p.ndim >= 2)


def decayed(params: dict[str, Array], names: Collection[str] | None) -> set[str]:
    """The parameters weight decay applies to: `names` when given (ZeRO-1's flat pieces of a
    parameter no longer show its shape), else those `decays` picks."""
    return set(names) if names is not None else {k for k, p in params.items() if decays(k, p)}


class SGD(_Plain):
    def __init__(
        self,
        params: dict[str, Array],
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decay: Collection[str] | None = None,
    ) -> None:
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.decay = decayed(params, decay)
        self.state = {k: v * 0 for k, v in params.items()}

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        """(step count, {slot: {param name: array}}): what a checkpoint stores."""
        return 0, {"momentum": self.state}

    def step(self, grads: dict[str, Array], lr: float, factor: float = 1.0) -> None:
        self._clip(grads, factor)
        for k, p in self.params.items():
            shrink = 1.0 - lr * self.weight_decay if self.weight_decay and k in self.decay else 1.0
            update = partial(_sgd, momentum=self.momentum, lr=lr, shrink=shrink)
            each_rows(update, p, grads[k], self.state[k])  # in place, block of rows by block


def _sgd(p: Array, g: Array, buf: Array, momentum: float, lr: float, shrink: float) -> None:
    buf *= momentum
    buf += g
    if shrink != 1.0:  # weight decay
        p *= shrink
    p -= lr * buf


class AdamW(_Plain):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    def __init__(
        self,
        params: dict[str, Array],
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay: Collection[str] | None = None,
    ) -> None:
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.decay = decayed(params, decay)
        self.m = {k: v * 0 for k, v in params.items()}
        self.v = {k: v * 0 for k, v in params.items()}
        self.t = 0

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        return self.t, {"m": self.m, "v": self.v}

    def step(self, grads: dict[str, Array], lr: float, factor: float = 1.0) -> None:
        self._clip(grads, factor)
        self.t += 1
        c1, c2 = 1.0 - self.betas[0] ** self.t, 1.0 - self.betas[1] ** self.t
        update = partial(_adamw, betas=self.betas, step=lr / c1, c2=c2, eps=self.eps)
        for k, p in self.params.items():
            shrink = 1.0 - lr * self.weight_decay if self.weight_decay and k in self.decay else 1.0
            each_rows(partial(update, shrink=shrink), p, grads[k], self.m[k], self.v[k])


def _adamw(
    p: Array, g: Array, m: Array, v: Array,
    betas: tuple[float, float], step: float, c2: float, eps: float, shrink: float,
) -> None:  # fmt: skip
    """One AdamW update in place; step = lr / (1 - b1^t), c2 = 1 - b2^t."""
    b1, b2 = betas
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * (g * g)
    if shrink != 1.0:  # decoupled weight decay
        p *= shrink
    p -= step * m / ((v / c2) ** 0.5 + eps)


class MixedPrecision:
    """16-bit training: the stage computes in fp16 or bf16, this keeps fp32 master weights and
    runs the optimizer on them; the 16-bit weights are refreshed from the masters after every
    step.

    fp16 (`scale` given) adds dynamic loss scaling: the loss gradient is multiplied by `scale`
    so small fp16 gradients do not flush to zero; a step whose gradients overflowed (a
    non-finite norm) is skipped and the scale halved; after `interval` good steps in a row the
    scale doubles. bf16 (`scale=None`) has float32's exponent range, so it needs no scaling: the
    scale stays 1 and a non-finite gradient stops the run, as in float32."""

    def __init__(
        self,
        params: dict[str, Array],
        make_inner: Any,
        scale: float | None = 2.0**15,
        interval: int = 1000,
    ) -> None:
        self.params = params
        self.master = {k: v.astype("float32") for k, v in params.items()}
        self.grads32 = {k: v * 0 for k, v in self.master.items()}
        self.inner: Optimizer = make_inner(self.master)
        self.scaling = scale is not None
        self.loss_scale, self.interval = (1.0 if scale is None else scale), interval
        self.good, self.skipped = 0, 0

    def overflowed(self) -> bool:
        """With loss scaling: skip this step and halve the scale. Without: the run stops."""
        if not self.scaling:
            return False
        self.loss_scale /= 2.0
        self.good = 0
        self.skipped += 1
        return True

    def step(self, grads: dict[str, Array], lr: float, factor: float = 1.0) -> None:
        """Step the masters with grads * factor / scale (factor: gradient clipping); with loss
        scaling, after `interval` good steps in a row the scale doubles."""
        for k, g in grads.items():
            g32 = self.grads32[k]
            g32[...] = g  # 16-bit -> fp32
            g32 *= factor / self.loss_scale
        self.inner.step(self.grads32, lr)
        for k, p in self.params.items():
            p[...] = self.master[k]  # fp32 -> 16-bit
        if not self.scaling:
            return
        self.good += 1
        if self.good >= self.interval:
            self.loss_scale *= 2.0
            self.good = 0

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        t, slots = self.inner.state_dict()
        return t, {"master": self.master, **slots}

    def scalars(self) -> dict[str, float]:
        """The loss scaler's state; none without loss scaling (bf16), so the metrics carry no
        loss scale that never moves and no skipped steps that cannot happen."""
        if not self.scaling:
            return {}
        return {"loss_scale": self.loss_scale, "good_steps": self.good, "skipped": self.skipped}

    def load_state(self, t: int, scalars: dict[str, float] | None) -> None:
        self.inner.load_state(t, None)
        for k, p in self.params.items():
            p[...] = self.master[k]
        if scalars and self.scaling:
            self.loss_scale = float(scalars.get("loss_scale", self.loss_scale))
            self.good = int(scalars.get("good_steps", 0))
            self.skipped = int(scalars.get("skipped", 0))


def load_state(opt: Optimizer, t: int, scalars: dict[str, float] | None = None) -> None:
    """Restore the step count and scalars (the slot arrays are filled in place by the caller)."""
    opt.load_state(t, scalars)


def make(
    name: str, params: dict[str, Array], cfg: Any, decay: Collection[str] | None = None
) -> Optimizer:
    """`decay`: the names weight decay applies to (default: those `decays` picks)."""
    if cfg.dtype in ("fp16", "bf16"):  # fp32 masters around the same optimizer
        inner = cfg.replace(dtype="float32")
        scale = cfg.loss_scale if cfg.dtype == "fp16" else None  # bf16: no loss scaling
        decay = decayed(params, decay)
        return MixedPrecision(params, lambda master: make(name, master, inner, decay), scale)
    if name == "adamw":
        return AdamW(params, weight_decay=cfg.weight_decay, decay=decay)
    if name == "sgd":
        return SGD(params, momentum=cfg.momentum, weight_decay=cfg.weight_decay, decay=decay)
    raise ValueError(f"unknown optimizer {name!r}")


def clip_factor(norm: float, max_norm: float) -> float:
    """Scale that brings a global gradient norm down to `max_norm` (1.0 when already below)."""
    if max_norm <= 0 or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)
