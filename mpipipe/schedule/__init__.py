"""What to do, as data: schedule builders, the checker/simulator, and lowering to messages.

Nothing in this package imports MPI or an array library.
"""

from __future__ import annotations

from collections.abc import Callable

from mpipipe.errors import ConfigError
from mpipipe.schedule.actions import Action, Plan, from_text, parse
from mpipipe.schedule.check import Costs, Report, check, render
from mpipipe.schedule.gpipe import forward_only, gpipe
from mpipipe.schedule.lower import buffer_releases, lower, peer, recv_buffer_peaks
from mpipipe.schedule.one_f_one_b import one_f_one_b

SCHEDULES: dict[str, Callable[[int, int], Plan]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build(name: str, pp: int, m: int) -> Plan:
    """The named schedule for `pp` ranks and `m` micro-batches."""
    try:
        builder = SCHEDULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown schedule {name!r} (choose one of: {', '.join(sorted(SCHEDULES))})"
        ) from None
    return builder(pp, m)


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
    "peer",
    "recv_buffer_peaks",
    "render",
]
