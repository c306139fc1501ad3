"""Per-step metrics: a log line on rank 0 and one JSON object per step in a .jsonl file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any


class MetricsFile:
    """One JSON object per line, rank 0 only; truncated at the start of a run. When the run
    resumes from a checkpoint it appends, and its first record drops every record of that step
    and later (a run that went past the checkpoint it resumes from wrote them), so each step is
    in the file once; a line cut short by a killed run goes too."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self.fh: IO[str] | None = None
        self.path, self.trim = Path(path) if path else None, append
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a" if append else "w")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self.fh:
            if self.trim:
                self._drop_from(int(record["step"]))
                self.trim = False
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def _drop_from(self, step: int) -> None:
        """Rewrite the file without the records of `step` and later (atomically: a new file
        renamed over the old one), then append to it."""
        assert self.fh is not None and self.path is not None
        self.fh.close()
        kept = []
        for line in self.path.read_text(errors="replace").splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # the last line of a killed run, cut short
            try:
                rec = json.loads(line)
            except ValueError:
                kept.append(line)  # not ours to judge: keep it
                continue
            ours = isinstance(rec, dict) and isinstance(rec.get("step"), int)
            if not ours or rec["step"] < step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def interactive(stream: IO[str], env: Mapping[str, str] | None = None) -> bool:
    """Is `stream` a terminal that a person watches (in-place redraws, progress bars)?

    `isatty()` answers for a process that a shell started, and under MPICH's mpiexec, which hands
    ranks pipes. Under Open MPI's mpirun it does not: every rank's stdout is a pseudo-terminal
    that mpirun made to forward output through, a terminal whether mpirun itself writes to one,
    to a file or to a pipe. There the answer is mpirun's own stdout, seen through /proc when
    mpirun is this rank's parent (ranks on the node it runs on); elsewhere (ranks under remote
    daemons, no /proc) the output is taken for a log. Open MPI marks its ranks with
    OMPI_COMM_WORLD_SIZE; direct launches (srun) do not set it and hand out honest descriptors.
    """
    env = os.environ if env is None else env
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    if "OMPI_COMM_WORLD_SIZE" not in env:
        return True
    try:
        launcher_stdout = os.readlink(f"/proc/{os.getppid()}/fd/1")
    except OSError:
        return False
    return launcher_stdout.startswith(("/dev/pts/", "/dev/tty"))


def measure_peak_flops(xp: Any, dtype: Any, n: int = 128, repeats: int = 3) -> tuple[float, str]:
    """FLOP/s of a plain n x n matrix product on this rank's device (best of `repeats`, on the
    backend's own clock): the reference for MFU when no --peak-tflops is given. Ranks sharing
    cores measure their share. n starts small and doubles (up to 8192) while one product takes
    under 5 ms: a fast device is measured full, not at its launch latency, and a slow product
    (NumPy's float16, which has no BLAS: about a minute at n = 768 on 4 ranks sharing 2 cores)
    is measured at the size that first takes 5 ms, in milliseconds. Returns the FLOP/s and the
    clock's name (CUDA events or perf_counter), which the log states."""
    from mpipipe.xp import best_seconds

    while True:
        a = xp.ones((n, n), dtype=dtype)
        best, clock = best_seconds(xp, lambda a=a: a @ a, repeats)
        if best >= 5e-3 or n >= 8192:
            return 2.0 * n**3 / best, clock
        n *= 2


def model_flops_per_step(meta: dict[str, Any], n_params: int, samples: int) -> float:
    """Training FLOPs per step: 6 per parameter per token (forward + backward), plus attention's
    12 * layers * seq_len * width per token for a GPT (PaLM's accounting)."""
    t = meta.get("seq_len", 1)
    per_token = 6.0 * n_params
    if meta.get("kind") == "gpt":
        per_token += 12.0 * meta["n_layer"] * t * meta["d_model"]
    return per_token * samples * t


def max_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log_line(rec: dict[str, Any], steps: int) -> str:
    width = len(str(steps))
    line = (
        f"step {rec['step']:>{width}}/{steps} | loss {rec['loss']:.4f} | "
        f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:>8.0f} tok/s | "
        f"{rec['step_time_s'] * 1e3:7.1f} ms/step | bubble {rec['bubble']:.2f}"
    )
    if "mfu" in rec:
        line += f" | MFU {rec['mfu']:.1%}"
    if "max_rss_mb" in rec:
        line += f" | mem/stage {'/'.join(f'{x:.0f}' for x in rec['max_rss_mb'])} MiB"
    if "eval_loss" in rec:
        line += f" | eval {rec['eval_loss']:.4f}"
    return line
