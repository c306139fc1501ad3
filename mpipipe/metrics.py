"""Per-step metrics: a log line on rank 0 and one JSON object per step in a .jsonl file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any


class MetricsFile:
    """One JSON object per line, rank 0 only; truncated at the start of a run, appended to when
    the run resumes from a checkpoint."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self.fh: IO[str] | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a" if append else "w")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def log_line(rec: dict[str, Any], steps: int) -> str:
    width = len(str(steps))
    line = (
        f"step {rec['step']:>{width}}/{steps} | loss {rec['loss']:.4f} | "
        f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:>8.0f} tok/s | "
        f"{rec['step_time_s'] * 1e3:7.1f} ms/step | bubble {rec['bubble']:.2f}"
    )
    if "eval_loss" in rec:
        line += f" | eval {rec['eval_loss']:.4f}"
    return line
