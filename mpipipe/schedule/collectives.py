"""Which actions hold a tensor-parallel collective, and the check that the ranks of a tp group
run them in one order.

MPI pairs the collectives of a communicator up by issue order, so the ranks of a tp group must
run the actions that hold them (F and B with --tp; W too with --sequence-parallel, whose weight
gradients gather their inputs again: parallel/sequence.py) in the same order, on the same
micro-batches and chunks; otherwise one rank's all-gather of micro-batch 1 meets another's of
micro-batch 0 (wrong sums, or a deadlock when the shapes differ). Today every rank of a tp group
runs the plan row of its pipeline rank, so this holds by construction; `check` proves it from
the map of which rank runs which row instead of assuming it, before anything runs, and names
the first action where two ranks would part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mpipipe.errors import ScheduleError
from mpipipe.schedule.actions import Action, Plan

Rows = Mapping[tuple[int, int], Sequence[Action]]  # (pipeline rank, tp index) -> its row


def holding(tp: int, sequence_parallel: bool = False) -> frozenset[str]:
    """The action kinds that hold tensor-parallel collectives."""
    if tp < 2:
        return frozenset()
    return frozenset("FBW") if sequence_parallel else frozenset("FB")


def rows(plan: Plan, tp: int) -> dict[tuple[int, int], Sequence[Action]]:
    """The row each (pipeline rank, tp index) runs: its pipeline rank's, for every tp index."""
    return {(r, t): plan.actions[r] for r in range(plan.pp) for t in range(tp)}


def check(rows: Rows, kinds: frozenset[str]) -> None:
    """Raise ScheduleError if two tp ranks of one pipeline rank would issue their collectives
    in different orders (the actions of `kinds`, in row order, must be equal)."""
    if not kinds:
        return
    by_stage: dict[int, dict[int, list[Action]]] = {}
    for (r, t), row in sorted(rows.items()):
        by_stage.setdefault(r, {})[t] = [a for a in row if a.kind in kinds]
    held = ", ".join(sorted(kinds))
    for r, group in by_stage.items():
        (t0, ref), *others = sorted(group.items())
        for t, seq in others:
            if seq == ref:
                continue
            pairs = enumerate(zip(ref, seq, strict=False))
            i = next((j for j, (a, b) in pairs if a != b), min(len(ref), len(seq)))
            mine = str(seq[i]) if i < len(seq) else "nothing"
            theirs = str(ref[i]) if i < len(ref) else "nothing"
            raise ScheduleError(
                f"pipeline rank {r}: tp ranks {t0} and {t} would run their tensor-parallel "
                f"collectives in different orders: collective-holding action #{i} is {theirs} on "
                f"tp rank {t0} but {mine} on tp rank {t} ({held} hold tp collectives and MPI "
                f"pairs them in issue order: give every tp rank of a stage the same order of "
                f"{held} actions)"
            )
