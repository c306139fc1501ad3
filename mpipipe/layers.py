"""Layers: kernels plus the parameters they own, as `{name: array}` with matching gradient buffers.

A layer never stores per-micro-batch state: `forward` returns `(out, ctx)`, `backward_input`
returns `(dx, wctx)` and `backward_weight(wctx)` accumulates into `grads`. The runtime keeps the
contexts, so any number of micro-batches can be in flight (DESIGN principle 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from mpipipe.kernels.attention import attention_backward_input, attention_forward
from mpipipe.kernels.embedding import embedding_backward_weight, embedding_forward
from mpipipe.kernels.gelu import gelu_backward_input, gelu_forward
from mpipipe.kernels.layernorm import (
    layernorm_backward_input,
    layernorm_backward_weight,
    layernorm_forward,
)
from mpipipe.kernels.linear import linear_backward_input, linear_backward_weight, linear_forward
from mpipipe.xp import Array


@dataclass
class Init:
    """Where a layer's parameters come from: a seeded generator, the dtype and the array module.

    Values are drawn in float64 on the host in a fixed order and then cast, so a layer's initial
    parameters depend only on (seed, global layer index), never on the rank that builds it.
    """

    rng: np.random.Generator
    dtype: np.dtype
    xp: ModuleType

    @classmethod
    def for_layer(cls, seed: int, index: int, dtype: Any, xp: ModuleType) -> Init:
        return cls(np.random.default_rng([seed, index]), np.dtype(dtype), xp)

    def normal(self, shape: tuple[int, ...], std: float) -> Array:
        return self.xp.asarray(self.rng.normal(0.0, std, size=shape).astype(self.dtype))

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return self.xp.zeros(shape, dtype=self.dtype)

    def ones(self, shape: tuple[int, ...]) -> Array:
        return self.xp.ones(shape, dtype=self.dtype)


class Layer(Protocol):
    params: dict[str, Array]
    grads: dict[str, Array]

    def forward(self, x: Array) -> tuple[Array, Any]: ...
    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]: ...
    def backward_weight(self, wctx: Any) -> None: ...
    def recompute_selectively(self) -> None:
        """From now on, drop from saved contexts what backward can cheaply recompute."""

    def rebind_grads(self, remap: dict[int, Array]) -> None:
        """Use other gradient arrays (views into flat buckets), here and in every child."""


class Base:
    """Parameter bookkeeping shared by all layers: a zeroed gradient buffer per parameter."""

    def __init__(self, params: dict[str, Array]) -> None:
        self.params = params
        self.grads = {k: v * 0 for k, v in params.items()}

    def recompute_selectively(self) -> None:
        """Nothing is cheap to recompute in most layers; attention overrides this."""

    def rebind_grads(self, remap: dict[int, Array]) -> None:
        """Replace gradient arrays by others (views into flat buckets): `remap` maps
        id(old array) -> new array."""
        self.grads = {k: remap.get(id(g), g) for k, g in self.grads.items()}

    def adopt(self, prefix: str, child: Base) -> None:
        """Expose a child's parameters (same arrays) under `prefix.`."""
        for k, v in child.params.items():
            self.params[f"{prefix}.{k}"] = v
            self.grads[f"{prefix}.{k}"] = child.grads[k]


class Linear(Base):
    def __init__(self, init: Init, c_in: int, c_out: int, std: float = 0.02, bias: bool = True):
        p = {"w": init.normal((c_in, c_out), std)}
        if bias:
            p["b"] = init.zeros((c_out,))
        super().__init__(p)

    def forward(self, x: Array) -> tuple[Array, Any]:
        return linear_forward(x, self.params["w"], self.params.get("b"))

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        return linear_backward_input(dy, self.params["w"]), (dy, ctx)

    def backward_weight(self, wctx: Any) -> None:
        dy, x = wctx
        linear_backward_weight(dy, x, self.grads["w"], self.grads.get("b"))


class LayerNorm(Base):
    def __init__(self, init: Init, c: int):
        super().__init__({"g": init.ones((c,)), "b": init.zeros((c,))})

    def forward(self, x: Array) -> tuple[Array, Any]:
        return layernorm_forward(x, self.params["g"], self.params["b"])

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        return layernorm_backward_input(dy, ctx, self.params["g"]), (dy, ctx)

    def backward_weight(self, wctx: Any) -> None:
        dy, ctx = wctx
        layernorm_backward_weight(dy, ctx, self.grads["g"], self.grads["b"])


class GELU(Base):
    def __init__(self, init: Init | None = None):
        super().__init__({})

    def forward(self, x: Array) -> tuple[Array, Any]:
        return gelu_forward(x)

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        return gelu_backward_input(dy, ctx), None

    def backward_weight(self, wctx: Any) -> None:
        return None


class Embedding(Base):
    """Token + learned position embedding: tokens (B, T) -> (B, T, C). First layer only."""

    def __init__(self, init: Init, vocab: int, c: int, max_len: int):
        super().__init__(
            {"wte": init.normal((vocab, c), 0.02), "wpe": init.normal((max_len, c), 0.01)}
        )

    def forward(self, x: Array) -> tuple[Array, Any]:
        return embedding_forward(x, self.params["wte"], self.params["wpe"])

    def backward_input(self, dy: Array, ctx: Any) -> tuple[None, Any]:
        return None, (dy, ctx)  # integer tokens have no gradient

    def backward_weight(self, wctx: Any) -> None:
        dy, tokens = wctx
        embedding_backward_weight(dy, tokens, self.grads["wte"], self.grads["wpe"])


class Sequential(Base):
    """Children applied in order; backward in reverse order, weight work deferred per child."""

    def __init__(self, children: list[tuple[str, Any]]):
        super().__init__({})
        self.children = children
        for name, child in children:
            self.adopt(name, child)

    def forward(self, x: Array) -> tuple[Array, Any]:
        ctxs = []
        for _, child in self.children:
            x, ctx = child.forward(x)
            ctxs.append(ctx)
        return x, ctxs

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]:
        wctxs = [None] * len(self.children)
        for i in reversed(range(len(self.children))):
            dy, wctxs[i] = self.children[i][1].backward_input(dy, ctx[i])
        return dy, wctxs

    def backward_weight(self, wctx: Any) -> None:
        for (_, child), w in zip(self.children, wctx, strict=True):
            child.backward_weight(w)

    def recompute_selectively(self) -> None:
        for _, child in self.children:
            child.recompute_selectively()

    def rebind_grads(self, remap: dict[int, Array]) -> None:
        super().rebind_grads(remap)
        for _, child in self.children:
            child.rebind_grads(remap)


class Attention(Sequential):
    """Causal multi-head self-attention: qkv projection, attention core, output projection."""

    def __init__(self, init: Init, c: int, n_head: int, proj_std: float = 0.02):
        super().__init__(
            [
                ("qkv", Linear(init, c, 3 * c)),
                ("core", _AttentionCore(n_head)),
                ("proj", Linear(init, c, c, std=proj_std)),
            ]
        )


class _AttentionCore(Base):
    def __init__(self, n_head: int):
        super().__init__({})
        self.n_head = n_head
        self.keep_scores = True  # False: selective recomputation of the attention scores

    def recompute_selectively(self) -> None:
        self.keep_scores = False  # the (B, H, T, T) scores are recomputed from q and k

    def forward(self, x: Array) -> tuple[Array, Any]:
        return attention_forward(x, self.n_head, self.keep_scores)

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        return attention_backward_input(dy, ctx), None

    def backward_weight(self, wctx: Any) -> None:
        return None


class MLP(Sequential):
    """Linear (C -> 4C), GELU, Linear (4C -> C)."""

    def __init__(self, init: Init, c: int, hidden: int | None = None, proj_std: float = 0.02):
        h = hidden or 4 * c
        super().__init__(
            [
                ("fc", Linear(init, c, h)),
                ("gelu", GELU()),
                ("proj", Linear(init, h, c, std=proj_std)),
            ]
        )


class Residual(Sequential):
    """x + f(x), with f the children in order (e.g. LayerNorm then Attention: pre-norm)."""

    def forward(self, x: Array) -> tuple[Array, Any]:
        y, ctx = super().forward(x)
        return y + x, ctx  # a fresh array: no child's saved context may alias the output

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]:
        dx, wctx = super().backward_input(dy, ctx)
        return dx + dy, wctx


class Block(Sequential):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, init: Init, c: int, n_head: int, n_layer: int):
        proj_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2: scale residual projections by depth
        super().__init__(
            [
                (
                    "attn",
                    Residual(
                        [
                            ("ln", LayerNorm(init, c)),
                            ("attn", Attention(init, c, n_head, proj_std)),
                        ]
                    ),
                ),
                (
                    "mlp",
                    Residual(
                        [("ln", LayerNorm(init, c)), ("mlp", MLP(init, c, proj_std=proj_std))]
                    ),
                ),
            ]
        )


class Head(Sequential):
    """Final LayerNorm and the LM head (C -> V, no bias): (B, T, C) -> logits (B, T, V)."""

    def __init__(self, init: Init, c: int, vocab: int):
        super().__init__(
            [("ln_f", LayerNorm(init, c)), ("lm_head", Linear(init, c, vocab, bias=False))]
        )
