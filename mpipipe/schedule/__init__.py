"""What to do, as data: schedule builders, the checker/simulator, and lowering to messages.

Nothing in this package imports MPI or an array library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mpipipe.errors import ConfigError
from mpipipe.schedule.actions import Action, Plan, from_text, parse
from mpipipe.schedule.check import Costs, Report, check, render, simulate
from mpipipe.schedule.gpipe import forward_only, gpipe
from mpipipe.schedule.interleaved import interleaved
from mpipipe.schedule.lower import (
    buffer_releases,
    lower,
    message,
    recv_buffer_peaks,
    recv_buffer_slots,
)
from mpipipe.schedule.one_f_one_b import one_f_one_b
from mpipipe.schedule.vshape import dualpipev, v_half, v_min
from mpipipe.schedule.zero_bubble import zb_h1, zbv


@dataclass(frozen=True)
class Family:
    """A schedule builder and the chunks per rank (virtual stages) it takes."""

    build: Callable[[int, int, int], Plan]
    chunks: tuple[int, ...] = (1,)  # accepted values of v; () means any v >= 2
    default_chunks: int = 1


SCHEDULES: dict[str, Family] = {
    "gpipe": Family(lambda pp, m, v: gpipe(pp, m)),
    "1f1b": Family(lambda pp, m, v: one_f_one_b(pp, m)),
    "interleaved": Family(interleaved, (), 2),
    "zb-h1": Family(lambda pp, m, v: zb_h1(pp, m)),
    "zbv": Family(lambda pp, m, v: zbv(pp, m), (2,), 2),
    "v-half": Family(lambda pp, m, v: v_half(pp, m), (2,), 2),
    "v-min": Family(lambda pp, m, v: v_min(pp, m), (2,), 2),
    "dualpipev": Family(lambda pp, m, v: dualpipev(pp, m), (2,), 2),
}


def chunks_for(name: str, v: int | None) -> int:
    """The virtual stages per rank that schedule `name` runs with (validating `v`)."""
    family = _family(name)
    if v is None:
        return family.default_chunks
    if family.chunks and v not in family.chunks or not family.chunks and v < 2:
        allowed = "2 or more" if not family.chunks else " or ".join(map(str, family.chunks))
        raise ConfigError(
            f"--schedule {name} takes --virtual-stages {allowed}, not {v} "
            "(leave the flag out, or pick another schedule)"
        )
    return v


def build(name: str, pp: int, m: int, v: int | None = None) -> Plan:
    """The named schedule for `pp` ranks, `m` micro-batches and `v` chunks per rank."""
    return _family(name).build(pp, m, chunks_for(name, v))


def _family(name: str) -> Family:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown schedule {name!r} (choose one of: {', '.join(sorted(SCHEDULES))})"
        ) from None


__all__ = [
    "SCHEDULES",
    "Action",
    "buffer_releases",
    "Costs",
    "Plan",
    "Report",
    "build",
    "check",
    "forward_only",
    "from_text",
    "gpipe",
    "lower",
    "one_f_one_b",
    "parse",
    "message",
    "recv_buffer_peaks",
    "recv_buffer_slots",
    "render",
    "simulate",
]
