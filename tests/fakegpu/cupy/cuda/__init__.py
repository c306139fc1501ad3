"""cupy.cuda of the fake: devices, streams and events (the engine is in cupy._fake)."""

from __future__ import annotations

from .. import _fake
from .._fake import Device, Event, Stream, get_current_stream, get_elapsed_time
from . import runtime

__all__ = [
    "Device",
    "Event",
    "Stream",
    "get_current_stream",
    "get_elapsed_time",
    "is_available",
    "runtime",
]


def is_available() -> bool:
    return _fake.DEVICES > 0
