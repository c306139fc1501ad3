"""The process grid: which ranks form a pipeline, on private duplicates of the user's communicator.

Today every rank of the communicator is one pipeline stage (pp = size). The pp x dp grid of the
data-parallel issue will split this communicator; the rest of the code already goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI


@dataclass
class Grid:
    world: MPI.Comm  # private duplicate of the user's communicator
    pp_comm: MPI.Comm  # the ranks of my pipeline, ordered by stage

    @property
    def pp(self) -> int:
        return self.pp_comm.Get_size()

    @property
    def stage_rank(self) -> int:
        return self.pp_comm.Get_rank()

    @classmethod
    def create(cls, comm: MPI.Comm) -> Grid:
        world = comm.Dup()
        return cls(world=world, pp_comm=world)

    def free(self) -> None:
        if self.pp_comm is not self.world:
            self.pp_comm.Free()
        self.world.Free()
