"""Models as lists of layer specs, so that a stage builds only the layers it owns.

A `LayerSpec` is a recipe (a factory taking an `Init`), not a layer: the stage that owns global
layer `i` calls it with `Init.for_layer(seed, i, ...)`, and parameters are named `layers.{i}.*`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from mpipipe.layers import GELU, MLP, Block, Embedding, Head, Init, Layer, Linear, Sequential

VOCAB = 256  # byte-level tokens


@dataclass(frozen=True)
class LayerSpec:
    """How to build one global layer. `body` layers count when splitting the model into stages;
    non-body layers (the embedding, the head) ride along with the first or last stage."""

    name: str
    factory: Callable[[Init], Layer]
    body: bool = True
    params: int = 0  # parameter count, if known without building (for --partition params)

    def build(self, init: Init) -> Layer:
        return self.factory(init)


@dataclass(frozen=True)
class Model:
    """A model: its layers in order and the shape of the activation between two layers.

    `act_shape(i, b)` is the shape of global layer i's output for a micro-batch of b samples; it
    sizes the receive buffers, so messages never need a header. The last layer's output goes to
    the loss (softmax cross-entropy against integer targets).
    """

    layers: Sequence[LayerSpec]
    act_shape: Callable[[int, int], tuple[int, ...]]
    meta: dict[str, Any] = field(default_factory=dict)
    input_example: Callable[[int], Any] | None = None  # a micro-batch of inputs (profiling)

    @property
    def n_body(self) -> int:
        return sum(1 for s in self.layers if s.body)


def gpt(
    n_layer: int,
    d_model: int,
    n_head: int,
    seq_len: int,
    vocab: int = VOCAB,
    seq_shards: int = 1,
    tied: bool = False,
    attention: str = "dense",
) -> Model:
    """GPT-style decoder: embedding, `n_layer` pre-norm blocks, final norm + LM head.
    `seq_shards`: with sequence parallelism (tp ranks), the activations between layers (the
    pipeline messages) are one token block, (b, seq_len / seq_shards, d_model). `tied`: the
    head multiplies by the token embedding (mpipipe/tied.py). `attention` names the attention
    core's kernel (layers.ATTENTION_KERNELS)."""
    from mpipipe.tied import TiedHead  # noqa: PLC0415 - tied.py builds on layers and mpi4py

    c, embed = d_model, partial(Embedding, vocab=vocab, c=d_model, max_len=seq_len)
    specs = [LayerSpec("embed", embed, False, (vocab + seq_len) * c)]
    specs += [  # qkv, proj, fc, proj weights and biases, two LayerNorms
        LayerSpec(
            f"block{i}",
            partial(Block, c=c, n_head=n_head, n_layer=n_layer, attention=attention),
            True,
            12 * c * c + 13 * c,
        )
        for i in range(n_layer)
    ]
    head = partial(TiedHead if tied else Head, c=c, vocab=vocab)
    specs.append(LayerSpec("head", head, False, 2 * c + (0 if tied else c * vocab)))
    last = len(specs) - 1

    def act_shape(i: int, b: int) -> tuple[int, ...]:
        return (b, seq_len, vocab) if i == last else (b, seq_len // seq_shards, d_model)

    def example(b: int) -> Any:
        return np.random.default_rng(0).integers(0, vocab, size=(b, seq_len))

    meta = {
        "kind": "gpt",
        "n_layer": n_layer,
        "d_model": d_model,
        "n_head": n_head,
        "seq_len": seq_len,
        "vocab": vocab,
        **({"tied": True} if tied else {}),  # absent when untied: older checkpoints still load
        "attention": attention,
    }
    return Model(specs, act_shape, meta, example)


def _mlp_block(init: Init, c: int) -> Layer:
    return Sequential([("fc", Linear(init, c, c)), ("gelu", GELU())])


def mlp(n_layer: int, d_model: int, seq_len: int, vocab: int = VOCAB) -> Model:
    """Plain MLP classifier of each byte's successor: embedding, `n_layer` Linear+GELU layers,
    a Linear classifier over the vocabulary. No attention: it sees one byte of context."""
    c, embed = d_model, partial(Embedding, vocab=vocab, c=d_model, max_len=seq_len)
    specs = [LayerSpec("embed", embed, False, (vocab + seq_len) * c)]
    specs += [
        LayerSpec(f"fc{i}", partial(_mlp_block, c=c), True, c * c + c) for i in range(n_layer)
    ]
    specs.append(
        LayerSpec("classifier", partial(Linear, c_in=c, c_out=vocab), False, c * vocab + vocab)
    )
    last = len(specs) - 1

    def act_shape(i: int, b: int) -> tuple[int, ...]:
        return (b, seq_len, vocab) if i == last else (b, seq_len, d_model)

    def example(b: int) -> Any:
        return np.random.default_rng(0).integers(0, vocab, size=(b, seq_len))

    return Model(
        specs,
        act_shape,
        {"kind": "mlp", "n_layer": n_layer, "d_model": d_model, "seq_len": seq_len},
        example,
    )


__all__ = ["MLP", "LayerSpec", "Model", "gpt", "mlp"]
