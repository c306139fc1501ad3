"""THE dependency rule of a pipeline, in one place; the checker, the list scheduler, lowering
and the executor all ask it.

Virtual stage k's forward output feeds F on k + 1; B on k produces the input gradient that feeds
B on k - 1; B needs its own F (the saved context), W needs its own B. An event is
(kind, micro-batch, virtual stage).
"""

from __future__ import annotations

Event = tuple[str, int, int]
FLOW = {"F": +1, "B": -1}  # where a compute action's output goes


def input_stage(kind: str, stage: int, n_stages: int) -> int | None:
    """The virtual stage whose output action `kind` on `stage` consumes (None: the pipeline's
    input for F on stage 0, the loss for B on the last stage, nothing for W)."""
    if kind not in FLOW:
        return None
    src = stage - FLOW[kind]
    return src if 0 <= src < n_stages else None


def output_stage(kind: str, stage: int, n_stages: int) -> int | None:
    """The virtual stage that consumes the output of action `kind` on `stage` (None at the
    ends of the pipeline, and for W)."""
    if kind not in FLOW:
        return None
    dst = stage + FLOW[kind]
    return dst if 0 <= dst < n_stages else None


def message_input(kind: str, mb: int, stage: int, n_stages: int) -> Event | None:
    """The event whose output action (kind, mb, stage) receives, possibly from another rank."""
    src = input_stage(kind, stage, n_stages)
    return None if src is None else (kind, mb, src)


def needs(kind: str, mb: int, stage: int, n_stages: int) -> list[Event]:
    """Every event that (kind, mb, stage) waits for: its input message and its own earlier
    passes (B after F, W after B)."""
    local = {"F": [], "B": [("F", mb, stage)], "W": [("B", mb, stage)]}[kind]
    remote = message_input(kind, mb, stage, n_stages)
    return local + ([remote] if remote is not None else [])
