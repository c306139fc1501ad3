"""Chrome / Perfetto traces merged from all ranks: `train --trace out.json`.

Every rank records spans on its own `perf_counter` clock; at start the ranks estimate each
clock's offset from rank 0's (the smallest difference over a few barrier rounds, which bounds
the error by one barrier's skew), and at the end rank 0 gathers the spans, shifts them onto its
clock and writes one JSON file: one track (pid) per rank, with compute actions (F/B/W), waits
for messages, the gradient all-reduce, the step's all-reduce and the optimizer. Open it in
https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mpi4py import MPI


def clock_offset(comm: MPI.Comm, rounds: int = 5) -> float:
    """Seconds to add to this rank's perf_counter to get rank 0's (collective)."""
    best = None
    for _ in range(rounds):
        comm.Barrier()
        mine = time.perf_counter()
        root = comm.bcast(mine, root=0)
        diff = root - mine
        if best is None or abs(diff) < abs(best):
            best = diff
    return float(best or 0.0)


class Tracer:
    """Collects this rank's spans for the steps in [first, first + count)."""

    def __init__(self, comm: MPI.Comm, path: str | None, first: int, count: int) -> None:
        self.comm, self.path = comm, path
        self.first, self.count = first, count
        self.events: list[dict[str, Any]] = []
        self.offset = clock_offset(comm) if path else 0.0

    def wants(self, step: int) -> bool:
        return self.path is not None and self.first <= step < self.first + self.count

    def span(self, name: str, cat: str, t0: float, t1: float, lane: int = 0, **args: Any) -> None:
        """One span on this rank's track `lane` (a thread of the rank: mbthreads.py)."""
        self.events.append(
            {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": (t0 + self.offset) * 1e6,
                "dur": (t1 - t0) * 1e6,
                "pid": self.comm.Get_rank(),
                "tid": lane,
                "args": args,
            }
        )

    def write(self, label: str) -> None:
        """Collective: rank 0 writes every rank's spans to the trace file."""
        if self.path is None:
            return
        gathered = self.comm.gather((label, self.events), root=0)
        if gathered is None:  # not rank 0
            return
        events: list[dict[str, Any]] = []
        t_min = min((e["ts"] for _, evs in gathered for e in evs), default=0.0)
        for rank, (name, evs) in enumerate(gathered):
            events.append(
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": rank,
                    "args": {"name": f"rank {rank}: {name}"},
                }
            )
            events.append(
                {
                    "name": "process_sort_index",
                    "ph": "M",
                    "pid": rank,
                    "args": {"sort_index": rank},
                }
            )
            for e in evs:
                events.append({**e, "ts": e["ts"] - t_min})
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
