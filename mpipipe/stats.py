"""The step's statistics: what each rank contributes, reduced over the grid in two messages whose
size depends on the model and the pipeline depth only, never on the number of ranks.

SUM: each layer's squared gradient norm (filled by replica 0 of the stage that owns the layer,
     zeros elsewhere, so the sum is exact and the same for every layout), the loss, the compute
     seconds, and the mean F/B/W seconds per virtual stage (replica 0 again).
MAX: the slowest rank's run and exposed all-reduce wait, a signal number (any rank's SIGTERM
     stops everybody), and per pipeline stage the largest replica's memory figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpipipe.parallel.transport import Transport


@dataclass
class StepStats:
    """One rank's figures for a step; `reduce` turns them into the grid's, in place."""

    n_layers: int
    n_stages: int
    pp: int
    layer_sq: np.ndarray = field(init=False)  # (n_layers,) SUM
    costs: np.ndarray = field(init=False)  # (3, n_stages) SUM: mean F, B, W seconds
    loss_sum: float = 0.0  # SUM
    busy: float = 0.0  # SUM: seconds of compute
    wall: float = 0.0  # MAX: the pipeline's run
    exposed: float = 0.0  # MAX: gradient all-reduce time not hidden by backward
    signum: int = 0  # MAX: a preemption signal on any rank
    rss_mb: np.ndarray = field(init=False)  # (pp,) MAX: peak resident memory per stage
    stash_mb: np.ndarray = field(init=False)  # (pp,) MAX: peak saved activations per stage

    def __post_init__(self) -> None:
        self.layer_sq = np.zeros(self.n_layers)
        self.costs = np.zeros((3, self.n_stages))
        self.rss_mb = np.zeros(self.pp)
        self.stash_mb = np.zeros(self.pp)

    def _sums(self) -> np.ndarray:
        return np.concatenate([self.layer_sq, self.costs.ravel(), [self.loss_sum, self.busy]])

    def _maxes(self) -> np.ndarray:
        head = [self.wall, self.exposed, float(self.signum)]
        return np.concatenate([head, self.rss_mb, self.stash_mb])

    @property
    def nbytes(self) -> int:
        """Bytes this rank sends per step for the statistics (both messages)."""
        return int(self._sums().nbytes + self._maxes().nbytes)

    def reduce(self, transport: Transport, comm: MPI.Comm) -> None:
        sums, maxes = self._sums(), self._maxes()
        transport.allreduce(comm, sums, MPI.SUM)
        transport.allreduce(comm, maxes, MPI.MAX)
        n, s = self.n_layers, 3 * self.n_stages
        self.layer_sq = sums[:n]
        self.costs = sums[n : n + s].reshape(3, self.n_stages)
        self.loss_sum, self.busy = float(sums[n + s]), float(sums[n + s + 1])
        self.wall, self.exposed, self.signum = float(maxes[0]), float(maxes[1]), int(maxes[2])
        self.rss_mb = maxes[3 : 3 + self.pp]
        self.stash_mb = maxes[3 + self.pp :]
