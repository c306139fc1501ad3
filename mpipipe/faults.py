"""Fault injection for tests and fire drills: ONE explicit hook, parsed once at start.

    --inject-fault raise@2:3       world rank 2 raises at (0-based) step 3
    --inject-fault stall@1:2       world rank 1 hangs at step 2 (the watchdog must say where)
    --inject-fault kill-in-save@0:4  world rank 0 SIGKILLs itself while saving step 4

Several are separated by commas. Nothing is read from the environment and nothing is checked on
a hot path but one set lookup per step.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from mpipipe.errors import ConfigError

KINDS = ("raise", "stall", "kill-in-save")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int


@dataclass(frozen=True)
class Faults:
    planned: frozenset[Fault] = frozenset()

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        if not spec:
            return cls()
        faults = set()
        for item in spec.split(","):
            try:
                kind, at = item.strip().split("@")
                rank, step = (int(x) for x in at.split(":"))
            except ValueError:
                raise ConfigError(
                    f"--inject-fault {item!r}: write KIND@RANK:STEP, e.g. raise@2:3 "
                    f"(kinds: {', '.join(KINDS)})"
                ) from None
            if kind not in KINDS:
                raise ConfigError(
                    f"--inject-fault {item!r}: unknown kind {kind!r} (choose {', '.join(KINDS)})"
                )
            faults.add(Fault(kind, rank, step))
        return cls(frozenset(faults))

    def step(self, rank: int, step: int) -> None:
        """At the start of a training step."""
        if Fault("raise", rank, step) in self.planned:
            raise RuntimeError(f"fault injected on rank {rank} at step {step} (--inject-fault)")
        if Fault("stall", rank, step) in self.planned:
            time.sleep(10**6)  # a rank that hangs, for the watchdog's tests

    def saving(self, rank: int, step: int) -> None:
        """In the middle of writing checkpoint `step` (after the shards, before the rename)."""
        if Fault("kill-in-save", rank, step) in self.planned:
            os.kill(os.getpid(), signal.SIGKILL)
