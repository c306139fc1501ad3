"""Vocabulary-parallel embedding and softmax cross-entropy (Megatron-LM): each rank of a tp group
holds the vocabulary rows [lo, lo + Vs) of the token embedding and the same columns of the LM
head's logits; no rank ever holds (N, V) logits.

`all_reduce(x, op)` is the tp group's collective (parallel/tensor.py), passed in so that these
stay pure functions of their arrays; Vs is the shard's vocabulary size (V / tp). The embedding
takes any `combine` of the group's partial sums: the all-reduce, or with sequence parallelism the
reduce-scatter that leaves each rank its token block, whose rows' `positions` it is given.
"""

from __future__ import annotations

from collections.abc import Callable

from mpipipe.xp import Array, namespace_of, scatter_add, widen

Reduce = Callable[[Array, str], Array]


def _local(targets: Array, lo: int, vs: int) -> tuple[Array, Array]:
    """Targets shifted into my shard's rows, and which fall inside it."""
    local = targets - lo  # (...)
    inside = (local >= 0) & (local < vs)  # (...)
    return local, inside


def vocab_embedding_forward(
    tokens: Array, wte: Array, wpe: Array, lo: int, combine: Callable[[Array], Array],
    positions: Array | None = None,
) -> tuple[Array, tuple[Array, Array]]:  # fmt: skip
    # tokens (B, T) int  wte (Vs, C) my rows  wpe (Tmax, C) whole
    xp = namespace_of(wte)
    local, inside = _local(tokens, lo, wte.shape[0])  # (B, T) each
    out = wte[xp.where(inside, local, 0)]  # (B, T, C), row 0 stands in for others' tokens
    out *= inside[..., None]  # others' tokens contribute exact zeros to the sum
    out = combine(out)  # (B, T', C): every token's row, from its owner (T' = T, or my block)
    out += wpe[: tokens.shape[1]] if positions is None else wpe[positions]  # (T' C) / (B, T', C)
    return out, (local, inside)


def vocab_embedding_backward_weight(
    dout: Array, cache: tuple[Array, Array], dwte: Array, dwpe: Array
) -> None:
    xp = namespace_of(dout)
    local, inside = cache  # (B, T) each
    b, t, c = dout.shape
    rows = xp.nonzero(inside.reshape(-1))[0]  # (n,) positions whose token is mine
    scatter_add(dwte, local.reshape(-1)[rows], dout.reshape(b * t, c)[rows])  # (Vs, C)
    dwpe[:t] += widen(dout).sum(axis=0).astype(dwpe.dtype, copy=False)  # (T, C)


def parallel_cross_entropy_forward_backward(
    logits: Array, targets: Array, scale: float, lo: int, all_reduce: Reduce
) -> tuple[Array, Array]:
    """Mean loss over positions and d(scale * loss)/d(my logits): the fused form of
    kernels/loss.py over a vocabulary shard. logits (..., Vs) my columns, targets (...) int."""
    xp = namespace_of(logits)
    vs = logits.shape[-1]
    z = widen(logits.reshape(-1, vs))  # (N, Vs), float32 for 16-bit logits
    y = targets.reshape(-1)  # (N,)
    n = z.shape[0]
    top = all_reduce(z.max(axis=1), "max")  # (N,) the row maxima over the whole vocabulary
    shifted = z - top[:, None]  # (N, Vs)
    probs = xp.exp(shifted)  # (N, Vs)
    local, inside = _local(y, lo, vs)  # (N,) each
    rows = xp.nonzero(inside)[0]  # (n,) positions whose target is mine
    both = xp.zeros((n, 2), dtype=z.dtype)  # (N, 2): sum of exponentials, target's logit
    both[:, 0] = probs.sum(axis=1)
    both[rows, 1] = shifted[rows, local[rows]]
    both = all_reduce(both, "sum")  # (N, 2), one message for both sums
    sums, picked = both[:, 0], both[:, 1]  # (N,) each
    loss = (xp.log(sums) - picked).mean()  # ()
    probs /= sums[:, None]  # my columns of the softmax
    probs[rows, local[rows]] -= 1.0
    probs *= scale / n
    return loss, probs.reshape(logits.shape).astype(logits.dtype, copy=False)


def parallel_cross_entropy_forward(
    logits: Array, targets: Array, lo: int, all_reduce: Reduce
) -> Array:
    """Mean loss only (evaluation), as a 0-d array."""
    return parallel_cross_entropy_forward_backward(logits, targets, 0.0, lo, all_reduce)[0]
