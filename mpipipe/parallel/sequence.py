"""Sequence parallelism (Korthikanti et al. 2022, `--sequence-parallel`, with --tp > 1).

Between layers, each rank of a tp group holds its token block, (B, T / tp, C): the LayerNorms,
the residual additions and the pipeline messages work on 1/tp of the activation (there is no
dropout). The block is a contiguous 1/tp of the B x T token rows in memory order (`Single` in
parallel/tensor.py): the sequence cut in tp when a micro-batch is one sample, as in Megatron;
with more samples the blocks run on across them. Megatron gets contiguous blocks by keeping
activations as [T, B, C]; cutting our [B, T, C] the same way along T would cost two transposing
copies of the activation per collective (measured: all-gather 0.15 and reduce-scatter 0.27 of
raw MPI's speed with them, 0.63 and 0.85 without, in benchmarks/bench_tp.py), and the per-row
layers between the matmuls do not mind which rows they hold. Only the embedding does (each
row's position): it is given them.

Where tensor parallelism alone all-reduces the residual stream, its two halves run apart, the
same bytes in all:

    embedding      partial rows of my vocabulary -> reduce-scatter -> my block (+ its positions)
    column layer   (qkv, fc, the LM head) all-gather my block -> (B, T, C) -> my columns;
                   backward: reduce-scatter of the input gradient
    row layer      (proj) my rows' partial products -> reduce-scatter -> my block (+ bias);
                   backward: all-gather of the output gradient; W gathers it again
    loss           the vocabulary-parallel cross-entropy over the WHOLE sequence: the head's
                   column layer gathers it, so the loss is computed exactly as with --tp alone

What is saved for backward is my block: a column layer keeps its input block, not the gathered
input, and its weight gradient gathers the input again inside W (keeping the gathered input
from B to W would undo the saving: a known pitfall of the zero-bubble reference code); a row
layer and the embedding keep their output gradient's block from B to W and gather it again in
W likewise. So with sequence parallelism W holds collectives too (schedule/collectives.py
checks that a tp group runs them in one order): a block's F, B and W each take 4.

The replicated parameters that see only my block (the LayerNorms' g and b) get gradients summed
over my positions; `SequenceGrads` all-reduces them over the tp group once per step, when their
layer's gradients are final (in the layer's last W, before its data-parallel bucket starts), in
one message per layer. The row-parallel biases need none: W computes theirs from the gathered
output gradient.
"""

from __future__ import annotations

from typing import Any

from mpipipe.parallel.tensor import TensorGroup
from mpipipe.xp import namespace_of


class SequenceGrads:
    """`(layer)`: complete the partial gradients of global layer `layer` (stage.partial) by an
    all-reduce over the tp group. Called by the executor when the layer's gradients are final."""

    def __init__(self, stage: Any, tp: TensorGroup) -> None:
        self.stage, self.tp = stage, tp

    def __call__(self, layer: int) -> None:
        names = self.stage.partial.get(layer)
        if not names:
            return
        grads = [self.stage.grads[n] for n in names]  # looked up now: buckets may rebind them
        xp = namespace_of(grads[0])
        total = self.tp.all_reduce(xp.concatenate([g.reshape(-1) for g in grads]))
        at = 0
        for g in grads:
            g[...] = total[at : at + g.size].reshape(g.shape)
            at += g.size


def check(tp: int, seq_len: int) -> str | None:
    """What keeps --sequence-parallel from running, with the fix; None if nothing."""
    if tp < 2:
        return (
            "--sequence-parallel needs --tp 2 or more (it shards the sequence across the "
            "tensor-parallel group: add --tp, or leave the flag out)"
        )
    if seq_len % tp:
        return (
            f"--sequence-parallel: --tp {tp} does not divide --seq-len {seq_len} (each tp rank "
            f"holds an equal block of each sequence: choose --seq-len a multiple of {tp})"
        )
    return None
