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

from mpipipe.kernels.accumulate import adds_through_hook, children_decide
from mpipipe.kernels.attention import attention_backward_input, attention_forward
from mpipipe.kernels.embedding import embedding_backward_weight, embedding_forward
from mpipipe.kernels.gelu import gelu_backward_input, gelu_forward
from mpipipe.kernels.layernorm import (
    layernorm_backward_input,
    layernorm_backward_weight,
    layernorm_forward,
)
from mpipipe.kernels.linear import linear_backward_input, linear_backward_weight, linear_forward
from mpipipe.kernels.tiled_attention import (
    tiled_attention_backward_input,
    tiled_attention_forward,
)
from mpipipe.kernels.vocab_parallel import (
    vocab_embedding_backward_weight,
    vocab_embedding_forward,
)
from mpipipe.parallel.tensor import SINGLE, Split, TensorGroup
from mpipipe.rowwise import add
from mpipipe.xp import Array, namespace_of


@dataclass
class Init:
    """Where a layer's parameters come from: a seeded generator, the dtype and the array module.

    Values are drawn in float64 on the host in a fixed order and then cast, so a layer's initial
    parameters depend only on (seed, global layer index), never on the rank that builds it. With
    tensor parallelism (`tp`, the group of ranks sharing the layer) a split parameter is drawn
    whole and then cut (`Split`), so the shards are exactly the single-process tensor's pieces;
    the whole tensor exists on the host only while it is cut. `sequence`: sequence parallelism
    (parallel/sequence.py): the residual stream between layers is my token block.
    """

    rng: np.random.Generator
    dtype: np.dtype
    xp: ModuleType
    tp: TensorGroup = SINGLE
    sequence: bool = False

    @classmethod
    def for_layer(
        cls,
        seed: int,
        index: int,
        dtype: Any,
        xp: ModuleType,
        tp: TensorGroup = SINGLE,
        sequence: bool = False,
    ) -> Init:
        rng = np.random.default_rng([seed, index])
        return cls(rng, np.dtype(dtype), xp, tp, sequence and tp.size > 1)

    def normal(self, shape: tuple[int, ...], std: float, split: Split | None = None) -> Array:
        whole = self.rng.normal(0.0, std, size=shape)
        if split is not None and self.tp.size > 1:
            whole = split.shard(whole, self.tp.size, self.tp.rank)
        return self.xp.asarray(whole.astype(self.dtype))

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return self.xp.zeros(shape, dtype=self.dtype)

    def ones(self, shape: tuple[int, ...]) -> Array:
        return self.xp.ones(shape, dtype=self.dtype)


class Layer(Protocol):
    """A layer; ours also carry `splits` (tensor parallelism: how each shard in `params` was
    cut) and `partial` (sequence parallelism: which gradients sum over my token block only),
    which a user's layer may leave out: its parameters are then whole on every rank."""

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
        self.splits: dict[str, Split] = {}  # tensor parallelism: how each shard was cut
        # sequence parallelism: replicated parameters whose gradients sum over my token block
        # only (the tp group all-reduces them once per step: parallel/sequence.py)
        self.partial: set[str] = set()

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
        for k, split in getattr(child, "splits", {}).items():
            self.splits[f"{prefix}.{k}"] = split
        self.partial |= {f"{prefix}.{k}" for k in getattr(child, "partial", ())}


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

    @adds_through_hook
    def backward_weight(self, wctx: Any) -> None:
        dy, x = wctx
        linear_backward_weight(dy, x, self.grads["w"], self.grads.get("b"))


class ColumnLinear(Linear):
    """Column-parallel Linear (Megatron): my columns of w and b, so my slice of the output; its
    input gradient is a partial sum over the group, all-reduced in backward (Megatron's `f`).
    `blocks`: the output is several fused matrices (qkv: 3), each split across the group.
    With sequence parallelism the input is my token block (B, T / tp, Cin): all-gathered
    before the product, and only the block is saved; the input gradient is reduce-scattered;
    the weight gradient gathers the input again (in W: a collective, see parallel/sequence.py)."""

    def __init__(self, init: Init, c_in: int, c_out: int, std: float = 0.02,
                 bias: bool = True, blocks: int = 1) -> None:  # fmt: skip
        self.tp, self.sequence, split = init.tp, init.sequence, Split(1, blocks)
        p = {"w": init.normal((c_in, c_out), std, split)}
        if bias:
            p["b"] = init.zeros((c_out // self.tp.size,))
        Base.__init__(self, p)
        self.splits = {"w": split, **({"b": Split(0, blocks)} if bias else {})}

    def forward(self, x: Array) -> tuple[Array, Any]:
        if not self.sequence:
            return super().forward(x)
        whole = self.tp.all_gather(x)  # (B, T, Cin) from my block (B, T / tp, Cin)
        out, _ = linear_forward(whole, self.params["w"], self.params.get("b"))  # (B, T, Cout/tp)
        return out, x  # my block only: the gathered input dies here

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        dx = linear_backward_input(dy, self.params["w"])  # (..., Cin), my columns' share
        if self.sequence:
            return self.tp.reduce_scatter(dx), (dy, ctx)  # (B, T / tp, Cin)
        return self.tp.all_reduce(dx), (dy, ctx)

    @adds_through_hook
    def backward_weight(self, wctx: Any) -> None:
        dy, x = wctx
        if self.sequence:
            x = self.tp.all_gather(x)  # (B, T, Cin) again, for this product only
        linear_backward_weight(dy, x, self.grads["w"], self.grads.get("b"))


class RowLinear(Linear):
    """Row-parallel Linear (Megatron): my rows of w take my slice of the input; the partial
    products are all-reduced in forward (Megatron's `g`), then the whole, replicated bias is
    added. The input gradient is my slice, with no collective. With sequence parallelism the
    sums are reduce-scattered (my token block of the output) and the output gradient, my
    block, is all-gathered in backward; W keeps the block and gathers it again (so what waits
    from B to W is 1/tp too), which makes the bias gradient whole, not a partial sum."""

    def __init__(self, init: Init, c_in: int, c_out: int, std: float = 0.02) -> None:
        self.tp, self.sequence = init.tp, init.sequence
        Base.__init__(
            self, {"w": init.normal((c_in, c_out), std, Split(0)), "b": init.zeros((c_out,))}
        )
        self.splits = {"w": Split(0)}

    def forward(self, x: Array) -> tuple[Array, Any]:
        out, ctx = linear_forward(x, self.params["w"], None)  # (..., Cout), partial
        out = self.tp.reduce_scatter(out) if self.sequence else self.tp.all_reduce(out)
        out += self.params["b"]
        return out, ctx

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        if not self.sequence:
            return super().backward_input(dy, ctx)
        whole = self.tp.all_gather(dy)  # (B, T, Cout) from my block
        return linear_backward_input(whole, self.params["w"]), (dy, ctx)  # keep the block

    @adds_through_hook
    def backward_weight(self, wctx: Any) -> None:
        dy, x = wctx
        if self.sequence:
            dy = self.tp.all_gather(dy)  # (B, T, Cout) again, for this product only
        linear_backward_weight(dy, x, self.grads["w"], self.grads.get("b"))


class LayerNorm(Base):
    def __init__(self, init: Init, c: int):
        super().__init__({"g": init.ones((c,)), "b": init.zeros((c,))})
        if init.sequence:  # normalises my token block: g and b see my rows only
            self.partial = {"g", "b"}

    def forward(self, x: Array) -> tuple[Array, Any]:
        return layernorm_forward(x, self.params["g"], self.params["b"])

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        return layernorm_backward_input(dy, ctx, self.params["g"]), (dy, ctx)

    @adds_through_hook
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

    @adds_through_hook
    def backward_weight(self, wctx: Any) -> None:
        return None


class Embedding(Base):
    """Token + learned position embedding: tokens (B, T) -> (B, T, C). First layer only. With
    tensor parallelism the token embedding is split by vocabulary rows (kernels/vocab_parallel)
    and the position embedding is replicated. With sequence parallelism the sum over the group
    is reduce-scattered (my token block, plus its rows' position embeddings); the weight
    gradient gathers the output gradient (in W), since my vocabulary rows occur anywhere."""

    def __init__(self, init: Init, vocab: int, c: int, max_len: int):
        self.tp, self.sequence = init.tp, init.sequence
        super().__init__(
            {
                "wte": init.normal((vocab, c), 0.02, Split(0)),
                "wpe": init.normal((max_len, c), 0.01),
            }
        )
        self.splits = {"wte": Split(0)}
        self.lo = self.tp.rank * (vocab // self.tp.size)  # my first vocabulary row

    def forward(self, x: Array) -> tuple[Array, Any]:
        if self.tp.size > 1:
            p = self.params
            if self.sequence:  # my token block: rows [r n, (r + 1) n) of the B x T in order
                xp, (b, t), tp = namespace_of(x), x.shape, self.tp
                n = b * t // tp.size
                positions = ((tp.rank * n + xp.arange(n)) % t).reshape(b, t // tp.size)
                combine = tp.reduce_scatter
                return vocab_embedding_forward(x, p["wte"], p["wpe"], self.lo, combine, positions)
            return vocab_embedding_forward(x, p["wte"], p["wpe"], self.lo, self.tp.all_reduce)
        return embedding_forward(x, self.params["wte"], self.params["wpe"])

    def backward_input(self, dy: Array, ctx: Any) -> tuple[None, Any]:
        return None, (dy, ctx)  # integer tokens have no gradient

    def backward_weight(self, wctx: Any) -> None:
        dy, tokens = wctx
        if self.sequence:
            dy = self.tp.all_gather(dy)  # (B, T, C) from my block
        if self.tp.size > 1:
            vocab_embedding_backward_weight(dy, tokens, self.grads["wte"], self.grads["wpe"])
            return
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

    @children_decide
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
    """Causal multi-head self-attention: qkv projection, attention core, output projection. With
    tensor parallelism each rank of the group computes n_head / tp heads: qkv column-parallel
    (q, k and v each split by heads), the output projection row-parallel."""

    def __init__(
        self, init: Init, c: int, n_head: int, proj_std: float = 0.02, kernel: str = "dense"
    ):
        super().__init__(
            [
                ("qkv", ColumnLinear(init, c, 3 * c, blocks=3)),
                ("core", _AttentionCore(n_head // init.tp.size, kernel)),
                ("proj", RowLinear(init, c, c, std=proj_std)),
            ]
        )


ATTENTION_KERNELS = ("tiled", "dense")  # kernels/tiled_attention.py, kernels/attention.py


class _AttentionCore(Base):
    """The attention core, by `kernel`: "tiled" saves per-row statistics and recomputes tile
    scores in backward (nothing T x T is kept, so selective recomputation changes nothing);
    "dense" keeps the (B, H, T, T) probabilities unless asked to recompute them."""

    def __init__(self, n_head: int, kernel: str = "dense"):
        super().__init__({})
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention kernel {kernel!r} is unknown (choose {' or '.join(ATTENTION_KERNELS)})"
            )
        self.n_head = n_head
        self.tiled = kernel == "tiled"
        self.keep_scores = True  # False: selective recomputation of the dense scores

    def recompute_selectively(self) -> None:
        self.keep_scores = False  # the (B, H, T, T) scores are recomputed from q and k

    def forward(self, x: Array) -> tuple[Array, Any]:
        if self.tiled:
            return tiled_attention_forward(x, self.n_head)
        return attention_forward(x, self.n_head, self.keep_scores)

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        if self.tiled:
            return tiled_attention_backward_input(dy, ctx), None
        return attention_backward_input(dy, ctx), None

    @adds_through_hook
    def backward_weight(self, wctx: Any) -> None:
        return None


class MLP(Sequential):
    """Linear (C -> 4C), GELU, Linear (4C -> C); with tensor parallelism the first is
    column-parallel, the second row-parallel (the hidden units are split across the group)."""

    def __init__(self, init: Init, c: int, hidden: int | None = None, proj_std: float = 0.02):
        h = hidden or 4 * c
        super().__init__(
            [
                ("fc", ColumnLinear(init, c, h)),
                ("gelu", GELU()),
                ("proj", RowLinear(init, h, c, std=proj_std)),
            ]
        )


class Residual(Sequential):
    """x + f(x), with f the children in order (e.g. LayerNorm then Attention: pre-norm)."""

    def forward(self, x: Array) -> tuple[Array, Any]:
        y, ctx = super().forward(x)
        return add(y, x), ctx  # a fresh array: no child's saved context may alias the output

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]:
        dx, wctx = super().backward_input(dy, ctx)
        return add(dx, dy), wctx


class Block(Sequential):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, init: Init, c: int, n_head: int, n_layer: int, attention: str = "dense"):
        proj_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2: scale residual projections by depth
        super().__init__(
            [
                (
                    "attn",
                    Residual(
                        [
                            ("ln", LayerNorm(init, c)),
                            ("attn", Attention(init, c, n_head, proj_std, attention)),
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
    """Final LayerNorm and the LM head (C -> V, no bias): (B, T, C) -> logits (B, T, V). With
    tensor parallelism the head is column-parallel: my vocabulary columns, (B, T, V / tp), for
    the parallel cross-entropy (kernels/vocab_parallel)."""

    def __init__(self, init: Init, c: int, vocab: int):
        super().__init__(
            [("ln_f", LayerNorm(init, c)), ("lm_head", ColumnLinear(init, c, vocab, bias=False))]
        )
