"""The process grid: pp x dp x tp ranks on private duplicates of the user's communicator.

Each world rank is one (stage, replica, tensor shard): `pp_comm` joins the stages of its
pipeline replica that hold the same shard index, `dp_comm` the replicas of its stage with the
same shard index, `tp_comm` the ranks that split one stage of one replica (tensor parallelism).
The tp group is innermost in rank numbers: its all-reduces (four per block and micro-batch, on
the critical path) stay inside a node whenever a node holds a multiple of tp ranks. With tp, a
pipeline message goes from tp rank t of stage s to tp rank t of stage s+1 (each rank of the group
holds the whole activation between blocks). Which of the other two dimensions is contiguous in
rank numbers is a choice (`--rank-order`):

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


def coords(rank: int, pp: int, dp: int, order: str, tp: int = 1) -> tuple[int, int, int]:
    """(stage, replica, tp index) of world rank `rank`: tp innermost, then `order`."""
    rest, shard = divmod(rank, tp)
    if order == "dp":
        return rest // dp, rest % dp, shard
    return rest % pp, rest // pp, shard


@dataclass
class Grid:
    world: MPI.Comm  # private duplicate of the user's communicator
    pp_comm: MPI.Comm  # my pipeline replica (my tp index), ranked by stage
    dp_comm: MPI.Comm  # the replicas of my stage (my tp index), ranked by replica
    order: str
    local_rank: int = 0  # rank among the processes on my node (picks my GPU, never the global)
    local_size: int = 1
    tp_comm: MPI.Comm | None = None  # the ranks sharing my stage's layers (None: tp 1)

    @property
    def pp(self) -> int:
        return self.pp_comm.Get_size()

    @property
    def dp(self) -> int:
        return self.dp_comm.Get_size()

    @property
    def tp(self) -> int:
        return 1 if self.tp_comm is None else self.tp_comm.Get_size()

    @property
    def stage_rank(self) -> int:
        return self.pp_comm.Get_rank()

    @property
    def replica(self) -> int:
        return self.dp_comm.Get_rank()

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp_comm is None else self.tp_comm.Get_rank()

    @classmethod
    def create(cls, comm: MPI.Comm, pp: int | None = None, order: str = "dp", tp: int = 1) -> Grid:
        world = comm.Dup()
        pp = pp or world.Get_size() // tp
        dp = world.Get_size() // (pp * tp)
        stage, replica, shard = coords(world.Get_rank(), pp, dp, order, tp)
        pp_comm = world.Split(color=replica * tp + shard, key=stage)
        dp_comm = world.Split(color=stage * tp + shard, key=replica)
        tp_comm = world.Split(color=stage * dp + replica, key=shard) if tp > 1 else None
        node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        return cls(world, pp_comm, dp_comm, order, local_rank, local_size, tp_comm)

    def layout(self) -> list[tuple[int, int, int, str, int]]:
        """(world rank, stage, replica, host, tp index) for every rank; collective."""
        mine = (
            self.world.Get_rank(),
            self.stage_rank,
            self.replica,
            MPI.Get_processor_name(),
            self.tp_rank,
        )
        return self.world.allgather(mine)

    def placement(self, device: str) -> list[tuple[int, str, int, str, int, int, int]]:
        """(world rank, host, local rank, device, stage, replica, tp index) for every rank;
        collective."""
        mine = (
            self.world.Get_rank(),
            MPI.Get_processor_name(),
            self.local_rank,
            device,
            self.stage_rank,
            self.replica,
            self.tp_rank,
        )
        return self.world.allgather(mine)

    def free(self) -> None:
        for c in (self.pp_comm, self.dp_comm, self.tp_comm, self.world):
            if c is not None:
                c.Free()
