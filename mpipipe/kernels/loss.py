"""Softmax cross-entropy over the last dimension, mean over all positions."""

from __future__ import annotations

from mpipipe.xp import Array, namespace_of, widen


def cross_entropy_forward_backward(
    logits: Array, targets: Array, scale: float
) -> tuple[Array, Array]:
    """Mean loss over positions and d(scale * loss)/d logits in one pass (the fused form).

    logits (..., V) float, targets (...) int. Returns (loss as a 0-d array on the logits' device:
    no host synchronisation per micro-batch, dlogits (..., V)).
    """
    xp = namespace_of(logits)
    v = logits.shape[-1]
    z = widen(logits.reshape(-1, v))  # (N, V), float32 for 16-bit logits: softmax and loss
    y = targets.reshape(-1)  # (N,)
    n = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)  # (N, V)
    probs = xp.exp(shifted)  # (N, V)
    sums = probs.sum(axis=1, keepdims=True)  # (N, 1)
    rows = xp.arange(n)
    loss = (xp.log(sums[:, 0]) - shifted[rows, y]).mean()  # ()
    probs /= sums  # softmax, in place
    probs[rows, y] -= 1.0
    probs *= scale / n
    return loss, probs.reshape(logits.shape).astype(logits.dtype, copy=False)


def cross_entropy_forward(logits: Array, targets: Array) -> Array:
    """Mean loss only (evaluation), as a 0-d array."""
    xp = namespace_of(logits)
    v = logits.shape[-1]
    z = widen(logits.reshape(-1, v))  # (N, V), float32 for 16-bit logits
    y = targets.reshape(-1)  # (N,)
    shifted = z - z.max(axis=1, keepdims=True)  # (N, V)
    lse = xp.log(xp.exp(shifted).sum(axis=1))  # (N,)
    return (lse - shifted[xp.arange(z.shape[0]), y]).mean()  # ()
