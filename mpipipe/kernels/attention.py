"""Causal multi-head attention core: softmax(q k^T / sqrt(D) + mask) v, heads split and merged.

The q/k/v and output projections are Linear layers around this core (see model.py), so the core
holds no weights and its backward is input-only.
"""

from __future__ import annotations

import math

from mpipipe.xp import Array, namespace_of


def attention_scores(q: Array, k: Array) -> Array:
    """Causal softmax(q k^T / sqrt(D)): (B, H, T, D) x 2 -> (B, H, T, T)."""
    xp = namespace_of(q)
    t, d = q.shape[2], q.shape[3]
    pre = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))  # (B, H, T, T)
    future = xp.triu(xp.ones((t, t), dtype=bool), k=1)  # (T, T) True above the diagonal
    pre[..., future] = -xp.inf
    pre -= pre.max(axis=-1, keepdims=True)
    att = xp.exp(pre)  # (B, H, T, T)
    att /= att.sum(axis=-1, keepdims=True)
    return att


def attention_forward(
    qkv: Array, n_head: int, keep_scores: bool = True
) -> tuple[Array, tuple[Array, ...]]:
    """`keep_scores=False` (selective recomputation) drops the (B, H, T, T) scores from the
    cache; the backward pass recomputes them from q and k, bit for bit."""
    b, t, c3 = qkv.shape  # (B, T, 3C)
    c = c3 // 3
    d = c // n_head
    qkv4 = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k, v = qkv4[0], qkv4[1], qkv4[2]  # (B, H, T, D) each
    att = attention_scores(q, k)  # (B, H, T, T)
    y = att @ v  # (B, H, T, D)
    out = y.transpose(0, 2, 1, 3).reshape(b, t, c)  # (B, T, C)
    return out, (q, k, v, att if keep_scores else None)


def attention_backward_input(dout: Array, cache: tuple[Array, ...]) -> Array:
    xp = namespace_of(dout)
    q, k, v, att = cache
    if att is None:
        att = attention_scores(q, k)  # (B, H, T, T) recomputed
    b, h, t, d = q.shape
    dy = dout.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, D)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dy  # (B, H, T, D)
    # softmax backward; masked entries have att == 0, so their gradient is 0 too
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, H, T, T)
    dpre *= 1.0 / math.sqrt(d)
    dq = dpre @ k  # (B, H, T, D)
    dk = dpre.transpose(0, 1, 3, 2) @ q  # (B, H, T, D)
    dqkv = xp.stack([dq, dk, dv])  # (3, B, H, T, D)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * h * d)  # (B, T, 3C)
