"""The process grid: pp x dp ranks on private duplicates of the user's communicator.

Each world rank is one (stage, replica): `pp_comm` joins the stages of its pipeline replica,
`dp_comm` joins the replicas of its stage. Which dimension is contiguous in rank numbers is a
choice (`--rank-order`):

- `dp` (default, as in Megatron-LM): the dp replicas of a stage are neighbours, so with ranks
  packed onto nodes the gradient all-reduce (the whole stage's gradients, once per step) stays
  inside a node and the pipeline's activation messages cross nodes.
- `pp`: a pipeline's stages are neighbours, so its messages (one per micro-batch and stage
  boundary, on the critical path) stay inside a node and the all-reduce crosses nodes. Better
  when activations are large against the gradients (long sequences, small models) or when
  inter-node latency would stall many small micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI


def coords(rank: int, pp: int, dp: int, order: str) -> tuple[int, int]:
    """(stage, replica) of world rank `rank`."""
    if order == "dp":
        return rank // dp, rank % dp
    return rank % pp, rank // pp


@dataclass
class Grid:
    world: MPI.Comm  # private duplicate of the user's communicator
    pp_comm: MPI.Comm  # my pipeline replica, ranked by stage
    dp_comm: MPI.Comm  # the replicas of my stage, ranked by replica
    order: str
    local_rank: int = 0  # rank among the processes on my node (picks my GPU, never the global)
    local_size: int = 1

    @property
    def pp(self) -> int:
        return self.pp_comm.Get_size()

    @property
    def dp(self) -> int:
        return self.dp_comm.Get_size()

    @property
    def stage_rank(self) -> int:
        return self.pp_comm.Get_rank()

    @property
    def replica(self) -> int:
        return self.dp_comm.Get_rank()

    @classmethod
    def create(cls, comm: MPI.Comm, pp: int | None = None, order: str = "dp") -> Grid:
        world = comm.Dup()
        pp = pp or world.Get_size()
        dp = world.Get_size() // pp
        stage, replica = coords(world.Get_rank(), pp, dp, order)
        pp_comm = world.Split(color=replica, key=stage)
        dp_comm = world.Split(color=stage, key=replica)
        node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        return cls(world, pp_comm, dp_comm, order, local_rank, local_size)

    def layout(self) -> list[tuple[int, int, int, str]]:
        """(world rank, stage, replica, host) for every rank; collective."""
        mine = (self.world.Get_rank(), self.stage_rank, self.replica, MPI.Get_processor_name())
        return self.world.allgather(mine)

    def placement(self, device: str) -> list[tuple[int, str, int, str, int, int]]:
        """(world rank, host, local rank, device, stage, replica) for every rank; collective."""
        mine = (
            self.world.Get_rank(),
            MPI.Get_processor_name(),
            self.local_rank,
            device,
            self.stage_rank,
            self.replica,
        )
        return self.world.allgather(mine)

    def free(self) -> None:
        for c in (self.pp_comm, self.dp_comm, self.world):
            c.Free()
