"""Tied embeddings (`--tie-embeddings yes`, GPT-2): the LM head multiplies by the token embedding.

    logits = LayerNorm(h) @ wte^T        h (B, T, C), wte (V, C), logits (B, T, V)

The head holds the weight as the embedding does, (V, C) (with --tp: its vocabulary rows, as the
vocabulary-parallel embedding, so the head's output is the column-parallel (B, T, V / tp) that
the parallel cross-entropy expects). Its gradient is summed with the embedding's after all W
work of the step and before the data-parallel reduction and clipping (`Tie.finish`):

- the rank that holds both (pp 1, or zbv's V, whose rank 0 holds the first and last chunks)
  shares ONE array: the head's weight is the embedding's, its gradient buffer is added into the
  embedding's and zeroed; the optimizer and the checkpoint see the embedding's name only;
- otherwise the first and last pipeline stages of a replica (and tp rank) each hold a copy, made
  equal at the start (a SUM with the head's zeros) and kept equal: the two gradients are
  all-reduced over a two-rank communicator, and both optimizers step the same numbers. The head's
  copy is left out of the norm, the parameter count and checkpoints (stored once, under the
  embedding's name; a load fills the copy from it).

The sum of two gradients is the same either way (a + b = b + a), so the pipelined run equals the
tied single-process run bitwise where nothing else changes the order. The data-parallel buckets
of the two tied layers start after the sum (they are held back from the overlap): with ZeRO-1
the sum must come before the reduce-scatter, as the two stages' blocks cut the weight apart at
different offsets.
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpipipe.kernels.linear import linear_backward_input, linear_backward_weight, linear_forward
from mpipipe.layers import Base, Init, LayerNorm, Sequential
from mpipipe.parallel.tensor import Split
from mpipipe.xp import Array, is_half

EMBED = "layers.0.wte"


def head_name(n_layers: int) -> str:
    return f"layers.{n_layers - 1}.lm_head.w"


class TiedLinear(Base):
    """y = x @ w^T with w (V, C) (my vocabulary rows with --tp): the embedding's weight. Filled
    by `Tie` (zeros until then); its input gradient is summed over the tp group (Megatron f)."""

    def __init__(self, init: Init, c: int, vocab: int) -> None:
        self.tp = init.tp
        super().__init__({"w": init.zeros((vocab // self.tp.size, c))})
        self.splits = {"w": Split(0)}

    def forward(self, x: Array) -> tuple[Array, Any]:
        return linear_forward(x, self.params["w"].T, None)  # (B, T, V / tp)

    def backward_input(self, dy: Array, ctx: Any) -> tuple[Array, Any]:
        dx = linear_backward_input(dy, self.params["w"].T)  # (B, T, C), my rows' share
        return self.tp.all_reduce(dx), (dy, ctx)

    def backward_weight(self, wctx: Any) -> None:
        dy, x = wctx
        linear_backward_weight(dy, x, self.grads["w"].T, None)  # (V / tp, C), transposed view


class TiedHead(Sequential):
    """Final LayerNorm, then logits against the token embedding (see the module docstring)."""

    def __init__(self, init: Init, c: int, vocab: int) -> None:
        super().__init__([("ln_f", LayerNorm(init, c)), ("lm_head", TiedLinear(init, c, vocab))])

    def share(self, w: Array) -> None:
        """Use the embedding's own array (the rank holds both)."""
        self.params["lm_head.w"] = self.children[1][1].params["w"] = w


class Tie:
    """The tied weight on my rank (see the module docstring); collective over `pp_comm` to
    build (every rank of a pipeline calls it)."""

    def __init__(
        self, stage: Any, n_layers: int, first: int, last: int, pp_comm: MPI.Comm, transport: Any
    ) -> None:
        self.stage, self.transport, self.n_layers = stage, transport, n_layers
        self.head, me = head_name(n_layers), pp_comm.Get_rank()
        self.layers = {i for i, n in ((0, EMBED), (n_layers - 1, self.head)) if n in stage.params}
        self.held: set[int] = set()
        self.shared: Array | None = None  # the head's own gradient buffer (one rank holds both)
        self.copy: str | None = None  # the head's copy (held on another rank than the embedding)
        self.comm: MPI.Comm | None = None
        if self.layers == {0, n_layers - 1}:
            stage.layers[n_layers - 1].share(stage.params[EMBED])
            del stage.params[self.head]
            self.shared = stage.grads.pop(self.head)
            stage.layer_params[n_layers - 1].remove(self.head)
        tied = me in (first, last) and first != last
        comm = pp_comm.Split(0 if tied else MPI.UNDEFINED, 0 if me == first else 1)
        if tied:
            self.comm, self.copy = comm, self.head if me == last else None
            self._sum(stage.params[EMBED if me == first else self.head])  # the copy: wte

    @property
    def mine(self) -> str | None:
        """My tied parameter's name (the embedding's, or the head's copy)."""
        return EMBED if EMBED in self.stage.params else self.copy

    def hold(self, i: int) -> bool:
        """Layer i's gradients are final: True if it is a tied layer, held until `finish`."""
        if i in self.layers:
            self.held.add(i)
            return True
        return False

    def finish(self) -> list[int]:
        """After all W work: sum the tied gradient; return the held layers (backward order),
        now final for the data-parallel reduction."""
        if self.shared is not None:
            self.stage.grads[EMBED] += self.shared
            self.shared.fill(0)
        elif self.comm is not None and self.mine is not None:
            self._sum(self.stage.grads[self.mine])
        held = sorted(self.held, reverse=True)
        self.held.clear()
        return held

    def _sum(self, x: Array) -> None:
        assert self.comm is not None
        buf = x.astype("float32") if is_half(x.dtype) else x
        self.transport.allreduce_now(self.comm, buf)
        if buf is not x:
            x[...] = buf

    def close(self) -> None:
        if self.comm is not None:
            self.comm.Free()
