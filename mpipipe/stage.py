"""What one rank owns: a Chunk per virtual stage it runs, the loss, parameters by global name.

Chunks come from a `Compute` (real math, with a recompute policy) or from emulate.py's
`EmulatedCompute` (sleeps of the configured length): the same Stage, the same parameters and
gradient buffers either way, so gradient reductions and the optimizer move real bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from mpipipe.kernels.loss import cross_entropy_forward, cross_entropy_forward_backward
from mpipipe.kernels.vocab_parallel import (
    parallel_cross_entropy_forward,
    parallel_cross_entropy_forward_backward,
)
from mpipipe.layers import Init, Layer
from mpipipe.model import Model
from mpipipe.parallel.tensor import SINGLE, Split, TensorGroup
from mpipipe.partition import uniform
from mpipipe.xp import Array, to_host


class ChunkLike(Protocol):
    """A contiguous run of global layers that the executor runs as one virtual stage."""

    indices: range
    layers: list[Layer]

    def forward(self, x: Array) -> tuple[Array, Any]: ...
    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array | None, Any]: ...
    def backward_weight(self, wctx: Any, done: Callable[[int], None] | None = None) -> None: ...


class Loss(Protocol):
    """The last stage's loss. Losses stay on the device (0-d arrays): one transfer per step."""

    def forward_backward(self, y: Array, targets: Array, scale: float) -> tuple[Array, Array]: ...
    def forward(self, y: Array, targets: Array) -> Array: ...


@dataclass
class SavedInput:
    """What full recomputation keeps of a micro-batch: the chunk's input only."""

    x: Array


class Chunk:
    """Real layers. `recompute`: "none" keeps every layer's context from forward to backward;
    "full" keeps only the chunk's input and runs the forward again at the start of
    backward_input; "selective" keeps everything but what the layers say is cheap to recompute
    (the attention scores (B, H, T, T), recomputed from q and k). The same operations run on the
    same inputs, so results are bitwise those of "none"."""

    def __init__(self, layers: list[Layer], indices: range, recompute: str = "none") -> None:
        self.indices, self.layers = indices, layers
        self.full = recompute == "full"
        if recompute == "selective":
            for layer in self.layers:
                layer.recompute_selectively()

    def _forward(self, x: Array) -> tuple[Array, list[Any]]:
        ctxs = []
        for layer in self.layers:
            x, ctx = layer.forward(x)
            ctxs.append(ctx)
        return x, ctxs

    def forward(self, x: Array) -> tuple[Array, Any]:
        y, ctxs = self._forward(x)
        return (y, SavedInput(x)) if self.full else (y, ctxs)

    def backward_input(self, dy: Array, ctxs: Any) -> tuple[Array | None, list[Any]]:
        if isinstance(ctxs, SavedInput):
            _, ctxs = self._forward(ctxs.x)
        wctxs: list[Any] = [None] * len(self.layers)
        for j in reversed(range(len(self.layers))):
            dy, wctxs[j] = self.layers[j].backward_input(dy, ctxs[j])
        return dy, wctxs

    def backward_weight(self, wctxs: list[Any], done: Callable[[int], None] | None = None) -> None:
        """Accumulate weight gradients, last layer first; `done(i)` after global layer i."""
        for j in reversed(range(len(self.layers))):
            self.layers[j].backward_weight(wctxs[j])
            if done is not None:
                done(self.indices[j])


class CrossEntropyLoss:
    """Softmax cross-entropy of the model's output against integer targets."""

    def forward_backward(self, y: Array, targets: Array, scale: float) -> tuple[Array, Array]:
        return cross_entropy_forward_backward(y, targets, scale)

    def forward(self, y: Array, targets: Array) -> Array:
        return cross_entropy_forward(y, targets)


class VocabParallelLoss:
    """Softmax cross-entropy over logits split by vocabulary across a tp group: my columns are
    the vocabulary rows [lo, lo + V / tp); the maxima and sums travel, never the logits."""

    def __init__(self, tp: TensorGroup, vocab: int) -> None:
        self.tp, self.lo = tp, tp.rank * (vocab // tp.size)

    def forward_backward(self, y: Array, targets: Array, scale: float) -> tuple[Array, Array]:
        return parallel_cross_entropy_forward_backward(
            y, targets, scale, self.lo, self.tp.all_reduce
        )

    def forward(self, y: Array, targets: Array) -> Array:
        return parallel_cross_entropy_forward(y, targets, self.lo, self.tp.all_reduce)


@dataclass(frozen=True)
class Compute:
    """Real chunks: layers built from (seed, global index), so any rank builds the same ones
    (with tensor parallelism, the same shards: `tp` is the group sharing them)."""

    seed: int
    dtype: Any
    xp: ModuleType
    recompute: str = "none"
    tp: TensorGroup = SINGLE
    sequence: bool = False  # sequence parallelism (parallel/sequence.py)

    def layers(self, model: Model, indices: range) -> list[Layer]:
        def init(i: int) -> Init:
            return Init.for_layer(self.seed, i, self.dtype, self.xp, self.tp, self.sequence)

        return [model.layers[i].build(init(i)) for i in indices]

    def chunk(self, model: Model, indices: range, k: int) -> ChunkLike:
        return Chunk(self.layers(model, indices), indices, self.recompute)

    def loss(self, model: Model) -> Loss:
        if self.tp.size > 1:
            return VocabParallelLoss(self.tp, int(model.meta["vocab"]))
        return CrossEntropyLoss()


class ComputeLike(Protocol):
    def chunk(self, model: Model, indices: range, k: int) -> ChunkLike: ...
    def loss(self, model: Model) -> Loss: ...


class Stage:
    """The chunks of the virtual stages `ids` (global layers `bounds[k]` each), the loss, and
    every parameter and gradient by its global name `layers.{i}.{name}`; with tensor
    parallelism these are my shards, and `splits` says how each split one was cut."""

    def __init__(
        self,
        model: Model,
        ids: Sequence[int],
        bounds: Sequence[range],
        compute: ComputeLike,
        tp: TensorGroup = SINGLE,
    ) -> None:
        self.ids, self.tp = ids, tp
        self.splits: dict[str, Split] = {}
        self.loss = compute.loss(model)
        self.chunks = [compute.chunk(model, bounds[k], k) for k in ids]
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.layer_params: dict[int, list[str]] = {}  # global layer index -> its param names
        # global layer index -> its parameters whose gradients are sums over my token block
        # only (sequence parallelism; parallel/sequence.py completes them)
        self.partial: dict[int, list[str]] = {}
        self.layers: dict[int, Layer] = {}  # global layer index -> the layer
        for chunk in self.chunks:
            for i, layer in zip(chunk.indices, chunk.layers, strict=True):
                self.layers[i] = layer
                names = []
                for k in sorted(layer.params):
                    name = param_name(i, k)
                    self.params[name] = layer.params[k]
                    self.grads[name] = layer.grads[k]
                    names.append(name)
                    split = getattr(layer, "splits", {}).get(k)  # a user's layer: none
                    if tp.size > 1 and split is not None:
                        self.splits[name] = split
                self.layer_params[i] = names
                partial = sorted(getattr(layer, "partial", ()))  # a user's layer: none
                if partial:
                    self.partial[i] = [param_name(i, k) for k in partial]

    @classmethod
    def of_rank(
        cls, model: Model, plan: Any, rank: int, compute: ComputeLike, bounds: Any = None
    ) -> Stage:
        """The stage of pipeline rank `rank` under `plan` (default bounds: a uniform split)."""
        if bounds is None:
            body = [s.body for s in model.layers]
            bounds = uniform(body, plan.n_stages, len(plan.stages[0]))
        return cls(model, plan.stages[rank], bounds, compute)

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def rebind_grads(self, remap: dict[int, Array]) -> None:
        """Replace gradient arrays by others (views into flat buckets), wherever a layer or its
        children refer to them; `remap` maps id(old array) -> new array."""
        for layer in self.layers.values():
            layer.rebind_grads(remap)
        self.grads = {k: remap.get(id(g), g) for k, g in self.grads.items()}


def param_name(layer: int, name: str) -> str:
    """The global name of parameter `name` of global layer `layer`."""
    return f"layers.{layer}.{name}"


def split_name(global_name: str) -> tuple[int, str]:
    """(global layer, parameter name) of a global name: the inverse of `param_name`."""
    _, layer, name = global_name.split(".", 2)
    return int(layer), name


def layer_sq_norms(grads: Mapping[str, Array], names: Sequence[str]) -> dict[int, float]:
    """The squared norm of the gradients `names` (global names: whole tensors, shards or
    ZeRO-1 pieces) summed per global layer: each in float64 by the backend's pairwise summation
    (the same on every layout; a threaded BLAS dot would split the sum by thread count), on the
    device, brought to the host in ONE transfer, then added exactly (fsum) per layer."""
    squares = []
    for n in names:
        g64 = grads[n].astype("float64", copy=False)
        squares.append((g64 * g64).sum())
    per_layer: dict[int, list[float]] = {}
    for n, sq in zip(names, to_host(squares), strict=True):
        per_layer.setdefault(split_name(n)[0], []).append(sq)
    return {i: math.fsum(v) for i, v in per_layer.items()}
