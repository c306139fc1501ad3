"""Causal attention core without the (T, T) matrix: FlashAttention-2's tiles and online softmax.

Same contract as kernels/attention.py (which stays the reference it is tested against): qkv
(B, T, 3C) in, (B, T, C) out, input gradient only. Queries are cut into tiles of `tile` rows
(T_q below); for each query tile the keys left of the diagonal come in tiles of `kv_tile`
columns (T_k) and the diagonal square last, so tiles above the diagonal are never computed (half
the score FLOPs and exponentials at long T). The softmax runs online (a running row maximum m and
row sum l, the partial output rescaled when m grows), and forward saves only the per-row
logsumexp L = m + log(l), (B, H, T), beside q, k, v and the output: O(B H T) instead of the dense
kernel's O(B H T^2). Backward recomputes each tile's probabilities P = exp(S - L) from q and k,
so selective recomputation (keep_scores=False) changes nothing here: nothing T x T is kept.

Summation order differs from the dense kernel (tile by tile), so the two agree to rounding, not
bitwise. 16-bit inputs: scores, statistics and every product with the probabilities in float32,
as in the dense kernel.
"""

from __future__ import annotations

import math
from typing import Any

from mpipipe.kernels.attention import causal_mask
from mpipipe.xp import Array, namespace_of, widen

TILE = 128  # query rows per tile (and the diagonal square's side)
KV_TILE = 512  # key columns per tile left of the diagonal; bigger tiles, fewer Python steps


def _key_tiles(i0: int, i1: int, kv_tile: int) -> list[tuple[int, int, bool]]:
    """(j0, j1, masked) for the query rows [i0, i1): full tiles left of the diagonal, then the
    diagonal square (masked). Diagonal first in forward would also do; this order is the same
    in forward and backward."""
    tiles = [(j0, min(j0 + kv_tile, i0), False) for j0 in range(0, i0, kv_tile)]
    return [*tiles, (i0, i1, True)]


def _heads(qkv: Array, n_head: int) -> tuple[Array, Array, Array]:
    b, t, c3 = qkv.shape  # (B, T, 3C)
    d = c3 // 3 // n_head
    qkv4 = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    return qkv4[0], qkv4[1], qkv4[2]  # (B, H, T, D) each, views


def _contiguous_heads(qkv: Array, n_head: int) -> tuple[Array, Array, Array]:
    """q / sqrt(D), k and v as contiguous (B, H, T, D) arrays in the compute dtype: tile slices
    of them are contiguous blocks for the products. Saved for backward instead of views of qkv:
    the same 3 B T C elements (qkv itself is then free), and backward copies nothing again."""
    xp = namespace_of(qkv)
    q, k, v = _heads(qkv, n_head)  # (B, H, T, D) views
    qs = xp.ascontiguousarray(q)  # (B, H, T, D), a copy: scaled in place
    qs *= 1.0 / math.sqrt(q.shape[3])
    return qs, xp.ascontiguousarray(k), xp.ascontiguousarray(v)


def tiled_attention_forward(
    qkv: Array, n_head: int, tile: int = TILE, kv_tile: int = KV_TILE
) -> tuple[Array, tuple[Any, ...]]:
    xp = namespace_of(qkv)
    b, t, c3 = qkv.shape  # (B, T, 3C)
    c = c3 // 3
    d = c // n_head
    qs, k, v = _contiguous_heads(qkv, n_head)  # (B, H, T, D) each, compute dtype
    qw, kw, vw = widen(qs), widen(k), widen(v)  # (B, H, T, D), the scores' dtype
    wide = qw.dtype
    y = xp.empty((b, t, n_head, d), dtype=wide)  # (B, T, H, D): the output's layout
    yh = y.transpose(0, 2, 1, 3)  # (B, H, T, D) view: tiles land in place
    lse = xp.empty((b, n_head, t, 1), dtype=wide)  # (B, H, T, 1) logsumexp of each score row
    for i0 in range(0, t, tile):
        i1 = min(i0 + tile, t)
        qi = qw[:, :, i0:i1]  # (B, H, T_q, D)
        m: Array = None  # running row maximum, row sum and output, from the first tile
        rowsum: Array = None
        acc: Array = None
        for j0, j1, masked in _key_tiles(i0, i1, kv_tile):
            s = qi @ kw[:, :, j0:j1].transpose(0, 1, 3, 2)  # (B, H, T_q, T_k) scores
            if masked:
                s += causal_mask(xp, i1 - i0, wide)  # the diagonal square: -inf above it
            if m is None:  # first tile: nothing to rescale
                m = s.max(axis=-1, keepdims=True)  # (B, H, T_q, 1)
                s -= m
                xp.exp(s, out=s)  # (B, H, T_q, T_k) unnormalised probabilities, in place
                rowsum = s.sum(axis=-1, keepdims=True)  # (B, H, T_q, 1)
                acc = s @ vw[:, :, j0:j1]  # (B, H, T_q, D)
                continue
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))  # (B, H, T_q, 1)
            s -= m_new
            xp.exp(s, out=s)  # (B, H, T_q, T_k)
            alpha = xp.exp(m - m_new)  # (B, H, T_q, 1): rescales what the old maximum gave
            rowsum *= alpha
            rowsum += s.sum(axis=-1, keepdims=True)
            acc *= alpha
            acc += s @ vw[:, :, j0:j1]  # (B, H, T_q, D)
            m = m_new
        acc /= rowsum
        yh[:, :, i0:i1] = acc
        lse[:, :, i0:i1] = m + xp.log(rowsum)  # (B, H, T_q, 1)
    out = y.reshape(b, t, c).astype(qkv.dtype, copy=False)  # (B, T, C), no copy unless 16-bit
    return out, (qs, k, v, out, lse)


def tiled_attention_backward_input(
    dout: Array, cache: tuple[Any, ...], tile: int = TILE, kv_tile: int = KV_TILE
) -> Array:
    xp = namespace_of(dout)
    qs, k, v, out, lse = cache
    b, h, t, d = qs.shape
    qw, kw, vw = widen(qs), widen(k), widen(v)  # (B, H, T, D), the scores' dtype
    wide = qw.dtype
    dy = xp.ascontiguousarray(
        dout.reshape(b, t, h, d).transpose(0, 2, 1, 3).astype(wide, copy=False)
    )  # (B, H, T, D)
    o = out.reshape(b, t, h, d).transpose(0, 2, 1, 3).astype(wide, copy=False)  # (B, H, T, D)
    # softmax backward needs sum_j dP_ij P_ij per row = sum_d dY_id Y_id (FlashAttention-2's D)
    delta = xp.einsum("bhtd,bhtd->bht", dy, o)[..., None]  # (B, H, T, 1)
    grads = xp.zeros((3, b, h, t, d), dtype=wide)  # dq (of the scaled q), dk, dv
    dq, dk, dv = grads[0], grads[1], grads[2]  # (B, H, T, D) each
    for i0 in range(0, t, tile):
        i1 = min(i0 + tile, t)
        qi, dyi = qw[:, :, i0:i1], dy[:, :, i0:i1]  # (B, H, T_q, D)
        for j0, j1, masked in _key_tiles(i0, i1, kv_tile):
            kj, vj = kw[:, :, j0:j1], vw[:, :, j0:j1]  # (B, H, T_k, D)
            p = qi @ kj.transpose(0, 1, 3, 2)  # (B, H, T_q, T_k) scores, recomputed
            if masked:
                p += causal_mask(xp, i1 - i0, wide)
            p -= lse[:, :, i0:i1]
            xp.exp(p, out=p)  # (B, H, T_q, T_k) probabilities P, in place; 0 where masked
            dv[:, :, j0:j1] += p.transpose(0, 1, 3, 2) @ dyi  # (B, H, T_k, D)
            ds = dyi @ vj.transpose(0, 1, 3, 2)  # (B, H, T_q, T_k) dP
            ds -= delta[:, :, i0:i1]
            ds *= p  # (B, H, T_q, T_k) dS = P * (dP - D): gradient of the scaled scores
            dq[:, :, i0:i1] += ds @ kj  # (B, H, T_q, D)
            dk[:, :, j0:j1] += ds.transpose(0, 1, 3, 2) @ qi  # (B, H, T_k, D)
    dq *= 1.0 / math.sqrt(d)  # the scores used q / sqrt(D): chain rule back to q
    dqkv = xp.empty((b, t, 3, h, d), dtype=dout.dtype)  # (B, T, 3, H, D), the qkv layout
    dqkv.transpose(2, 0, 3, 1, 4)[...] = grads  # (3, B, H, T, D) view
    return dqkv.reshape(b, t, 3 * h * d)  # (B, T, 3C)
