"""Causal multi-head attention core: softmax(q k^T / sqrt(D) + mask) v, heads split and merged.

The q/k/v and output projections are Linear layers around this core (see model.py), so the core
holds no weights and its backward is input-only. For 16-bit inputs (fp16, bf16) the scores, the
softmax and its backward are float32, and the products with the scores too; the outputs are cast
back to the compute dtype (`astype(..., copy=False)`: a no-op for float32 and float64). The
softmax and its backward are row by row: they run over blocks of the B H score matrices on the
rank's cores (`rowwise.each_rows`).

From T = 192 every T x T quantity is worked in bands of query rows (`_bands`), each over the
keys up to its last row: the masked keys past a band are never multiplied, exponentiated or
differentiated. The six products then cost 5/8 of the whole ones with 4 bands (the input
gradients for k and v by bands of keys instead, each over the queries that see them). Measured
(B 8, H 4, T 256, D 64, float32, one thread, 2026-11-30): a 1-rank GPT step (bench_step, seq
256) 3788 ms twice against 4415 and 4289 ms for the whole products, alternating. In float64 the
results equal the whole products' bit for bit at T = 256 and to rounding at T = 194.
"""

from __future__ import annotations

import math
from typing import Any

from mpipipe.rowwise import each_rows
from mpipipe.xp import Array, namespace_of, wide_dtype

_MASKS: dict[tuple[Any, int, Any], Array] = {}


def causal_mask(xp: Any, t: int, dtype: Any) -> Array:
    """(T, T): 0 on and below the diagonal, -inf above; built once per (backend, T, dtype)."""
    key = (xp.__name__, t, str(dtype))
    if key not in _MASKS:
        _MASKS[key] = xp.triu(xp.full((t, t), -xp.inf, dtype=dtype), k=1)
    return _MASKS[key]


def attention_scores(q: Array, k: Array) -> Array:
    """Causal softmax(q k^T / sqrt(D)): (B, H, T, D) x 2 -> (B, H, T, T), in float32 for 16-bit
    q and k. The product runs band by band (`_bands`): each band of query rows against the keys
    up to its last row only, so the masked keys past a band cost no product (5/8 of the T x T
    products with 4 bands); the softmax then masks the band's diagonal block and zeroes the
    rest."""
    xp = namespace_of(q)
    t, d = q.shape[2], q.shape[3]
    qs = q * (1.0 / math.sqrt(d))  # (B, H, T, D), the scale on q, not on the T x T scores
    kt = k.transpose(0, 1, 3, 2)  # (B, H, D, T) view
    att = xp.empty((*q.shape[:2], t, t), dtype=wide_dtype(q.dtype))  # (B, H, T, T)
    _scores_by_bands(qs, kt, att)
    each_rows(_causal_softmax, att.reshape(-1, t, t))  # (B H, T, T) view, in place
    return att


def _scores_by_bands(a: Array, bt: Array, out: Array) -> None:
    """out = a @ bt, (B, H, T, D) x (B, H, D, T) -> (B, H, T, T), only where a causal row sees
    the key: each band of rows against the keys up to its last row."""
    for i0, i1 in _bands(out.shape[-1]):
        _product(a[:, :, i0:i1], bt[..., :i1], out[:, :, i0:i1, :i1])


def _apply_by_bands(p: Array, x: Array, out: Array) -> None:
    """out = p @ x for causal p (B, H, T, T) and x (B, H, T, D): each band of rows over the
    keys it sees."""
    for i0, i1 in _bands(p.shape[-1]):
        _product(p[:, :, i0:i1, :i1], x[:, :, :i1], out[:, :, i0:i1])


def _apply_transposed_by_bands(p: Array, x: Array, out: Array) -> None:
    """out = p^T @ x for causal p (B, H, T, T) and x (B, H, T, D), by bands of keys: the keys
    [j0, j1) are seen by the queries from j0 on (one product per output row, no sum of bands)."""
    for j0, j1 in _bands(p.shape[-1]):
        seen = p[:, :, j0:, j0:j1].transpose(0, 1, 3, 2)  # (B, H, keys, queries from j0)
        _product(seen, x[:, :, j0:], out[:, :, j0:j1])


def _product(a: Array, b: Array, out: Array) -> None:
    """out[...] = a @ b, straight into `out` (a view) when the dtypes match, else through the
    product's own array, cast into `out` (16-bit operands into float32 scores: NumPy's bfloat16
    product is float32, its float16 product and CuPy's are 16-bit, rounded before the cast as
    `widen(q @ k)` rounded them)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        namespace_of(out).matmul(a, b, out=out)
    else:
        out[...] = a @ b


BANDS = 4  # bands of query rows per score matrix (see _bands)
BANDS_FROM = 192  # shorter sequences take one band: 4 bands' calls cost more than they save.
# The whole attention core, forward + backward, best of 50 alternating, one thread, B 8 H 4,
# float32 (2026-11-30): T = 128 D = 32 whole 7.30 / 8.01 / 10.68 ms against banded 7.56 / 7.64
# / 11.45 (the softmax alone banded: 8.41 / 9.04 / 11.96); T = 192 19.36 against 19.30;
# T = 256 D = 64 42.5-43.9 against 39.4-39.9.


def _bands(t: int) -> list[tuple[int, int]]:
    """Query rows [i0, i1) of each band. Every key past i1 is masked for all of a band's rows,
    so the softmax and its backward read and write the band's first i1 columns only (its
    masked rest is set to 0 once): (BANDS + 1) / (2 BANDS) of the T x T work, 5/8 with 4 bands.
    The bands depend on T alone, so every backend and every split of the B H matrices sums the
    same elements in the same order."""
    step = -(-t // (BANDS if t >= BANDS_FROM else 1))
    return [(i0, min(i0 + step, t)) for i0 in range(0, t, step)]


def _causal_softmax(att: Array) -> None:
    """Softmax of causal scores in place: att (n, T, T), n of the B H score matrices."""
    xp = namespace_of(att)
    t = att.shape[-1]
    mask = causal_mask(xp, t, att.dtype)
    for i0, i1 in _bands(t):
        band = att[:, i0:i1, :i1]  # (n, rows, i1) view
        band[:, :, i0:] += mask[i0:i1, i0:i1]  # the diagonal block: every key before it is seen
        band -= band.max(axis=-1, keepdims=True)
        xp.exp(band, out=band)
        band /= xp.einsum("nij->ni", band)[..., None]  # row sums without a temporary
        att[:, i0:i1, i1:] = 0  # exp(-inf): the keys after every row of the band


def _softmax_backward(datt: Array, att: Array) -> None:
    """dpre = att * (datt - sum(datt * att)) in place in datt: (n, T, T) each. Masked entries
    have att == 0, so their gradient is 0 too."""
    xp = namespace_of(att)
    for i0, i1 in _bands(att.shape[-1]):
        d, a = datt[:, i0:i1, :i1], att[:, i0:i1, :i1]  # (n, rows, i1) views
        row = xp.einsum("nij,nij->ni", d, a)[..., None]  # (n, rows, 1), no temporary
        d -= row
        d *= a
        datt[:, i0:i1, i1:] = 0


def attention_forward(
    qkv: Array, n_head: int, keep_scores: bool = True
) -> tuple[Array, tuple[Array, ...]]:
    """`keep_scores=False` (selective recomputation) drops the (B, H, T, T) scores from the
    cache; the backward pass recomputes them from q and k, bit for bit."""
    xp = namespace_of(qkv)
    b, t, c3 = qkv.shape  # (B, T, 3C)
    c = c3 // 3
    d = c // n_head
    qkv4 = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k, v = qkv4[0], qkv4[1], qkv4[2]  # (B, H, T, D) each
    att = attention_scores(q, k)  # (B, H, T, T)
    y = xp.empty((b, t, n_head, d), dtype=att.dtype)  # the output's (B, T, H, D) layout
    yh, vw = y.transpose(0, 2, 1, 3), v.astype(att.dtype, copy=False)  # (B, H, T, D) each
    _apply_by_bands(att, vw, yh)
    out = y.reshape(b, t, c).astype(qkv.dtype, copy=False)  # (B, T, C)
    return out, (q, k, v, att if keep_scores else None)


def attention_backward_input(dout: Array, cache: tuple[Array, ...]) -> Array:
    xp = namespace_of(dout)
    q, k, v, att = cache
    if att is None:
        att = attention_scores(q, k)  # (B, H, T, T) recomputed
    b, h, t, d = q.shape
    wide = att.dtype  # float32 for 16-bit inputs: every product with the scores in it
    dy = dout.reshape(b, t, h, d).transpose(0, 2, 1, 3).astype(wide, copy=False)  # (B, H, T, D)
    vt = v.transpose(0, 1, 3, 2).astype(wide, copy=False)  # (B, H, D, T)
    datt = xp.empty((b, h, t, t), dtype=wide)  # (B, H, T, T)
    _scores_by_bands(dy, vt, datt)  # the rows' unmasked columns only, as in the forward pass
    dqkv = xp.empty((b, t, 3, h, d), dtype=dout.dtype)  # (B, T, 3, H, D), the qkv layout
    heads = dqkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D) view: products land in place
    _apply_transposed_by_bands(att, dy, heads[2])  # dv = att^T dy
    each_rows(_softmax_backward, datt.reshape(-1, t, t), att.reshape(-1, t, t))  # in place
    dpre = datt  # (B, H, T, T), gradient of the scaled scores (q / sqrt(D)) k^T
    scale = 1.0 / math.sqrt(d)
    kw = k.astype(wide, copy=False)
    _apply_by_bands(dpre, kw, heads[0])  # dq, before the scale
    heads[0] *= scale  # on (B, H, T, D), not on the (B, H, T, T) scores
    qs = (q * scale).astype(wide, copy=False)  # (B, H, T, D)
    _apply_transposed_by_bands(dpre, qs, heads[1])  # dk
    return dqkv.reshape(b, t, 3 * h * d)  # (B, T, 3C)
