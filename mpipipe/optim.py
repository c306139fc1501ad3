"""Optimizers (SGD with momentum, AdamW), the learning-rate schedule, and clipping.

Every update is element-wise on one tensor, so a parameter's new value depends only on its own
gradient and state: the results are the same whichever stage holds it.
"""

from __future__ import annotations

import math
from typing import Any

from mpipipe.xp import Array


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def decays(name: str, p: Array) -> bool:
    """Weight decay applies to matrices (weights, embeddings), not to biases and norm gains."""
    return bool(p.ndim >= 2)


class SGD:
    def __init__(
        self, params: dict[str, Array], momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.state = {k: v * 0 for k, v in params.items()}

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        """(step count, {slot: {param name: array}}): what a checkpoint stores."""
        return 0, {"momentum": self.state}

    def step(self, grads: dict[str, Array], lr: float) -> None:
        for k, p in self.params.items():
            buf = self.state[k]
            buf *= self.momentum
            buf += grads[k]
            if self.weight_decay and decays(k, p):
                p *= 1.0 - lr * self.weight_decay
            p -= lr * buf


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    def __init__(
        self,
        params: dict[str, Array],
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
    ) -> None:
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.m = {k: v * 0 for k, v in params.items()}
        self.v = {k: v * 0 for k, v in params.items()}
        self.t = 0

    def state_dict(self) -> tuple[int, dict[str, dict[str, Array]]]:
        return self.t, {"m": self.m, "v": self.v}

    def step(self, grads: dict[str, Array], lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for k, p in self.params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay and decays(k, p):
                p *= 1.0 - lr * self.weight_decay
            p -= (lr / c1) * m / ((v / c2) ** 0.5 + self.eps)


def load_state(opt: SGD | AdamW, t: int) -> None:
    """Restore the step count (the slot arrays are filled in place by the caller)."""
    if isinstance(opt, AdamW):
        opt.t = t


def make(name: str, params: dict[str, Array], cfg: Any) -> SGD | AdamW:
    if name == "adamw":
        return AdamW(params, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return SGD(params, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def clip_factor(norm: float, max_norm: float) -> float:
    """Scale that brings a global gradient norm down to `max_norm` (1.0 when already below)."""
    if max_norm <= 0 or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)
