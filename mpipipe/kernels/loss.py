"""Softmax cross-entropy over the last dimension, mean over all positions.

Each position's loss and logit gradient depend on its own row only: they run over blocks of rows
on the rank's cores (`rowwise.map_rows`); the mean over positions is one call."""

from __future__ import annotations

from mpipipe.rowwise import map_rows
from mpipipe.xp import Array, namespace_of, widen


def cross_entropy_forward_backward(
    logits: Array, targets: Array, scale: float
) -> tuple[Array, Array]:
    """Mean loss over positions and d(scale * loss)/d logits in one pass (the fused form).

    logits (..., V) float, targets (...) int. Returns (loss as a 0-d array on the logits' device:
    no host synchronisation per micro-batch, dlogits (..., V)).
    """
    v = logits.shape[-1]
    factor = scale / (logits.size // v)  # scale / N
    losses, dlogits = map_rows(
        lambda z, y: _rows(z, y, factor), logits.reshape(-1, v), targets.reshape(-1)
    )  # (N,), (N, V)
    return losses.mean(), dlogits.reshape(logits.shape)


def _rows(logits: Array, y: Array, factor: float) -> tuple[Array, Array]:
    """Each row's loss and factor * d(loss)/d logits: logits (n, V), y (n,) int."""
    xp = namespace_of(logits)
    z = widen(logits)  # (n, V), float32 for 16-bit logits: softmax and loss
    shifted = z - z.max(axis=1, keepdims=True)  # (n, V)
    probs = xp.exp(shifted)  # (n, V)
    sums = probs.sum(axis=1, keepdims=True)  # (n, 1)
    rows = xp.arange(z.shape[0])
    losses = xp.log(sums[:, 0]) - shifted[rows, y]  # (n,)
    probs /= sums  # softmax, in place
    probs[rows, y] -= 1.0
    probs *= factor
    return losses, probs.astype(logits.dtype, copy=False)


def cross_entropy_forward(logits: Array, targets: Array) -> Array:
    """Mean loss only (evaluation), as a 0-d array."""
    xp = namespace_of(logits)
    v = logits.shape[-1]
    z = widen(logits.reshape(-1, v))  # (N, V), float32 for 16-bit logits
    y = targets.reshape(-1)  # (N,)
    shifted = z - z.max(axis=1, keepdims=True)  # (N, V)
    lse = xp.log(xp.exp(shifted).sum(axis=1))  # (N,)
    return (lse - shifted[xp.arange(z.shape[0]), y]).mean()  # ()
