"""Element-wise work on blocks of rows (mpipipe/rowwise.py): every kernel that hands its work to
the backend gives, on several threads, bitwise the result of one call on one thread."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mpipipe import TrainConfig, rowwise, train
from mpipipe.kernels.attention import attention_backward_input, attention_forward
from mpipipe.kernels.gelu import gelu_backward_input, gelu_forward
from mpipipe.kernels.layernorm import layernorm_backward_input, layernorm_forward
from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.optim import SGD, AdamW
from mpipipe.xp import dtype_of

DTYPES = ("float32", "float64", "fp16", "bf16")


@pytest.fixture
def blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give even tiny arrays several threads; back to the default afterwards."""
    monkeypatch.setattr(rowwise, "MIN_SHARE", 1)
    yield
    rowwise.use_threads(1)


def same(a: Any, b: Any) -> bool:
    """Bitwise equal arrays (or tuples of them), dtypes and shapes included."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def flat(a: Any) -> tuple[Any, ...]:
    """Nested tuples of arrays as one flat tuple (None left out)."""
    if isinstance(a, tuple):
        return tuple(x for item in a for x in flat(item))
    return () if a is None else (a,)


def on_threads(fn: Callable[[], Any], n: int, block: int) -> Any:
    """fn() on n threads with blocks of `block` elements (n = 1, block = 0: one call)."""
    rowwise.use_threads(n, block)
    try:
        return fn()
    finally:
        rowwise.use_threads(1)


SPLITS = [(1, 700), (2, 0), (3, 700)]  # (threads, block): blocks only, threads only, both


def cases(dtype: str) -> dict[str, Callable[[], Any]]:
    dt = dtype_of(dtype)
    r = np.random.default_rng(3)
    x = r.standard_normal((3, 37, 64)).astype(dt)  # (B, T, C): 111 rows, uneven blocks
    dout = r.standard_normal((3, 37, 64)).astype(dt)
    g, b = r.standard_normal(64).astype(dt), r.standard_normal(64).astype(dt)
    qkv = r.standard_normal((3, 37, 3 * 64)).astype(dt)  # 4 heads of 16
    labels = r.integers(0, 64, (3, 37))  # x as logits over a vocabulary of 64
    _, gelu_cache = gelu_forward(x)
    _, ln_cache = layernorm_forward(x, g, b)
    _, att_cache = attention_forward(qkv, 4)
    return {
        "gelu forward": lambda: flat(gelu_forward(x)),
        "gelu backward": lambda: gelu_backward_input(dout, gelu_cache),
        "layernorm forward": lambda: flat(layernorm_forward(x, g, b)),
        "layernorm backward": lambda: layernorm_backward_input(dout, ln_cache, g),
        "attention forward": lambda: flat(attention_forward(qkv, 4)),
        "attention backward": lambda: attention_backward_input(dout, att_cache),
        "residual add": lambda: rowwise.add(x, dout),
        "cross-entropy": lambda: cross_entropy_forward_backward(x, labels, 0.5),
        "broadcast add": lambda: rowwise.add(x, g),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_blocks_of_rows_equal_one_call_bitwise(blocks: None, dtype: str) -> None:
    for name, fn in cases(dtype).items():
        one = on_threads(fn, 1, 0)
        for n, block in SPLITS:
            assert same(on_threads(fn, n, block), one), f"{name}, {dtype}, {n} threads, {block}"


@pytest.mark.parametrize("make", [AdamW, SGD])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optimizer_steps_on_blocks_equal_one_call_bitwise(blocks: None, make: Any, dtype: str):
    r = np.random.default_rng(4)
    shapes = {"w": (41, 30), "b": (30,), "e": (7, 3, 5)}
    start = {k: r.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: r.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(3)]

    def run() -> dict[str, np.ndarray]:
        params = {k: v.copy() for k, v in start.items()}
        opt = make(params, weight_decay=0.1)
        for i, g in enumerate(grads):
            opt.step({k: v.copy() for k, v in g.items()}, lr=1e-2 * (i + 1))
        return params

    one = on_threads(run, 1, 0)
    for n, block in SPLITS:
        split = on_threads(run, n, block)
        assert all(same(split[k], one[k]) for k in shapes), f"{n} threads, blocks of {block}"


def test_training_on_two_threads_equals_one_thread_bitwise(
    blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threads come from the BLAS's thread count (the user's OMP_NUM_THREADS here)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # share_cores leaves the BLAS as it is
    cfg = TrainConfig(
        layers=2, d_model=32, heads=2, seq_len=16, global_batch=4, microbatches=2, steps=2,
        eval_every=0, eval_batches=1,
    )  # fmt: skip
    losses = {}
    for n in (1, 2):
        with threadpool_limits(n, user_api="blas"):
            result = train(cfg, out=io.StringIO())
            assert rowwise.threads() == n  # set by the runtime from the BLAS
        losses[n] = [r["loss"] for r in result.history]
    assert losses[1] == losses[2]


def test_errors_and_thread_counts(blocks: None) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        rowwise.use_threads(0)
    rowwise.use_threads(2)
    with pytest.raises(ValueError, match="one leading axis"):
        rowwise.each_rows(lambda a, b: None, np.zeros((4, 2)), np.zeros((5, 2)))

    def fail(a: np.ndarray) -> np.ndarray:
        if a[0, 0] > 0:  # the second block only: raised on the pool, re-raised here
            raise RuntimeError("second block")
        return a

    with pytest.raises(RuntimeError, match="second block"):
        rowwise.map_rows(fail, np.arange(8.0).reshape(4, 2))
    with threadpool_limits(1, user_api="blas"):
        assert rowwise.blas_threads() == 1
