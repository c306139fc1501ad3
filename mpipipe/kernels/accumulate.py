"""Weight gradients enter their buffers through `add_into`, so that a caller can hold the
additions back and make them later, in an order of its choosing.

Outside `held()`, `add_into(dst, src)` is `dst += src`. Inside it (on the calling thread only),
the pair is recorded instead, and the caller adds the records with `apply`, in the order they
were made. mbthreads.py uses it: a micro-batch's weight-gradient products run at once on its
thread, and only the additions wait for the micro-batch's turn at the buffer, so the sums are
made in the serial run's order, bitwise, while the products overlap.

A layer's backward_weight qualifies when every addition it makes goes through `add_into`: the
layer classes that do mark their method with `@adds_through_hook`; `holds_adds(layer)` says
whether a layer qualifies (a subclass that overrides backward_weight, such as a user's layer,
does not, unless it marks its own method; a Sequential qualifies when all its children do).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from mpipipe.xp import Array

_local = threading.local()
F = TypeVar("F", bound=Callable[..., Any])


def add_into(dst: Array, src: Array) -> None:
    """dst += src now, or, inside `held()`, when the holder applies it."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        dst += src
    else:
        pending.append((dst, src))


@contextmanager
def held() -> Iterator[list[tuple[Array, Array]]]:
    """Record this thread's `add_into` calls instead of making them; yields the records."""
    if getattr(_local, "pending", None) is not None:
        raise RuntimeError("held() does not nest")
    _local.pending = []
    try:
        yield _local.pending
    finally:
        _local.pending = None


def apply(pending: list[tuple[Array, Array]]) -> None:
    """Make the recorded additions, in their order."""
    for dst, src in pending:
        dst += src


def adds_through_hook(method: F) -> F:
    """Mark a backward_weight whose every addition into a gradient buffer is an `add_into`."""
    method.adds_through_hook = True  # type: ignore[attr-defined]
    return method


def holds_adds(layer: Any) -> bool:
    """Whether `held()` catches every addition layer.backward_weight makes."""
    method = layer.backward_weight  # an instance's own override counts too
    method = getattr(method, "__func__", method)
    if getattr(method, "adds_through_hook", False):
        return True
    if not getattr(method, "children_decide", False):
        return False
    children = getattr(layer, "children", ())
    return all(holds_adds(child) for _, child in children)


def children_decide(method: F) -> F:
    """Mark a composite's backward_weight that only calls its children's: `holds_adds` asks
    them."""
    method.children_decide = True  # type: ignore[attr-defined]
    return method
