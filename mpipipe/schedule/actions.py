"""The schedule IR: tiny immutable actions with an exact `str()` / `parse()` round trip, and a
`Plan` that holds one action list per rank plus which virtual stage each (rank, chunk) owns.

Compute actions: `F3` forward of micro-batch 3, `B3` its input gradient, `W3` its weight gradient.
Communication (added by `lower`, never by a builder): `SA3`/`RA3` send/receive the activation that
feeds F3 on the next stage, `SG3`/`RG3` send/receive the gradient that feeds B3 on the previous
stage. A chunk other than 0 is written after a dot: `F3.1` is micro-batch 3 on chunk 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

COMPUTE = ("F", "B", "W")
COMM = ("SA", "RA", "SG", "RG")
_PATTERN = re.compile(rf"^({'|'.join(COMPUTE + COMM)})(\d+)(?:\.(\d+))?$")


@dataclass(frozen=True, order=True)
class Action:
    kind: str
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


def parse(text: str) -> Action:
    """Inverse of `str(action)`: 'F3' -> Action('F', 3), 'B2.1' -> Action('B', 2, 1)."""
    m = _PATTERN.match(text.strip())
    if not m:
        raise ValueError(
            f"cannot parse action {text!r} (expected e.g. F3, B3, W3, or F3.1 for chunk 1)"
        )
    return Action(m.group(1), int(m.group(2)), int(m.group(3) or 0))


def F(mb: int, chunk: int = 0) -> Action:  # noqa: N802 - the names are the notation
    return Action("F", mb, chunk)


def B(mb: int, chunk: int = 0) -> Action:  # noqa: N802
    return Action("B", mb, chunk)


def W(mb: int, chunk: int = 0) -> Action:  # noqa: N802
    return Action("W", mb, chunk)


@dataclass(frozen=True)
class Plan:
    """One action list per rank. `stages[r][c]` is the virtual stage that rank r runs as chunk c;
    virtual stage k's output feeds virtual stage k + 1."""

    name: str
    microbatches: int
    stages: tuple[tuple[int, ...], ...]
    actions: tuple[tuple[Action, ...], ...]

    @property
    def pp(self) -> int:
        return len(self.stages)

    @cached_property
    def n_stages(self) -> int:
        return sum(len(s) for s in self.stages)

    def owner(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs virtual stage `stage`."""
        for r, chunks in enumerate(self.stages):
            if stage in chunks:
                return r, chunks.index(stage)
        raise KeyError(stage)

    def with_actions(self, actions: Sequence[Sequence[Action]]) -> Plan:
        return Plan(self.name, self.microbatches, self.stages, tuple(tuple(a) for a in actions))

    def __str__(self) -> str:
        return "\n".join(" ".join(str(a) for a in row) for row in self.actions)


def linear_stages(pp: int) -> tuple[tuple[int, ...], ...]:
    """One chunk per rank, rank r runs stage r."""
    return tuple((r,) for r in range(pp))


def from_text(text: str, microbatches: int | None = None, name: str = "custom") -> Plan:
    """A hand-written schedule: one line per rank, actions separated by spaces; '#' comments.
    Chunks map to stages in the interleaved way (rank r, chunk c -> stage c * pp + r)."""
    rows = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append(tuple(parse(tok) for tok in line.split()))
    if not rows:
        raise ValueError("the schedule text has no action lines (one line of actions per rank)")
    pp = len(rows)
    v = 1 + max((a.chunk for row in rows for a in row), default=0)
    m = microbatches if microbatches is not None else 1 + max(a.mb for row in rows for a in row)
    stages = tuple(tuple(c * pp + r for c in range(v)) for r in range(pp))
    return Plan(name, m, stages, tuple(rows))
