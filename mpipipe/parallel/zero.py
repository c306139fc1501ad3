"""ZeRO-1 (Rajbhandari et al., SC20): optimizer state and fp32 masters sharded over the replicas.

The gradient buckets of parallel/data_parallel.py are flat and padded to a multiple of the dp
replicas; replica r owns block r of every bucket. Its optimizer is an ordinary one (optim.py)
made over its *pieces*: for each parameter, the part of it that falls in an owned block, as a
1-D view into the parameter (a parameter that straddles a block boundary has a piece on two
replicas). So the state (momentum, Adam's m and v, fp32 masters and gradients) is 1/dp of the
stage's, and every update stays element-wise: a piece's new values are those the whole tensor
would get. Weight decay is decided per parameter from its whole shape (the `decay` names: flat
pieces cannot show it), so pieces need no per-element masks and blocks need not align with
parameters.

One step: the buckets are reduce-scattered as backward finishes them (overlapped, as the
all-reduce is), the optimizer steps my pieces, then `gather()` packs my pieces into a block and
all-gathers every bucket's blocks into the bucket itself (the gradients are spent by then: the
next step zeroes them) and copies the parameters out of it. The all-gathers of all buckets are
in flight together (the progress thread advances them) and each bucket is copied out as soon as
its gather is complete; they do not overlap the optimizer's arithmetic.

The clipping norm is summed over the shards: each replica adds the squares of its pieces per
layer (in float64, pairwise) and the step's statistics sum the layers over the grid, in the
MPI library's reduction order, which MPI recommends (and MPICH and Open MPI keep) to be the same
on every call for the same communicator: deterministic, equal to the unsharded norm to rounding.

Checkpoints stay whole (`whole_state`): per bucket and slot the blocks are all-gathered, so each
replica holds one bucket's slot whole at a time and replica 0 (the writer) the stage's whole
state until it is written, as without ZeRO. A load cuts each rank's pieces out of the whole
tensors (`cuts`).
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpipipe.optim import decays
from mpipipe.parallel.data_parallel import GradReducer
from mpipipe.parallel.tensor import owned
from mpipipe.parallel.transport import Transport
from mpipipe.stage import layer_sq_norms
from mpipipe.xp import Array, namespace_of


class ZeroShards:
    """My pieces of a stage's parameters, over the reducer's padded buckets."""

    def __init__(
        self, stage: Any, reducer: GradReducer, comm: MPI.Comm, transport: Transport
    ) -> None:
        self.stage, self.reducer, self.comm, self.transport = stage, reducer, comm, transport
        rank = comm.Get_rank()
        self.params: dict[str, Array] = {}  # name -> my piece: a 1-D view into the parameter
        self.grads: dict[str, Array] = {}  # name -> its reduced gradient: a view into my block
        self.cuts: dict[str, tuple[int, int]] = {}  # name -> my piece's flat [start, stop)
        self.where: list[list[tuple[str, int, int]]] = []  # per bucket: (name, block lo, hi)
        self.decay = {n for n, p in stage.params.items() if decays(n, p)}
        for names, block in zip(reducer.names, reducer.shards, strict=True):
            lo, hi, offset = rank * block.size, (rank + 1) * block.size, 0
            self.where.append([])
            for name in names:
                p = stage.params[name]
                a, z = max(offset, lo), min(offset + p.size, hi)
                if a < z:
                    flat = p.reshape(-1)
                    if not flat.flags.c_contiguous or not p.flags.c_contiguous:
                        raise ValueError(f"--zero 1 needs contiguous parameters; {name} is not")
                    self.params[name] = flat[a - offset : z - offset]
                    self.grads[name] = block[a - lo : z - lo]
                    self.cuts[name] = (a - offset, z - offset)
                    self.where[-1].append((name, a - lo, z - lo))
                offset += p.size
        self.sends = [namespace_of(b).zeros_like(b[: s.size]) for b, s in self._pairs()]

    def _pairs(self) -> list[tuple[Array, Array]]:
        return list(zip(self.reducer.buckets, self.reducer.shards, strict=True))

    def gather(self) -> None:
        """After the optimizer step: every replica's updated pieces into every parameter."""
        requests = []
        for b, (bucket, send) in enumerate(zip(self.reducer.buckets, self.sends, strict=True)):
            for name, a, z in self.where[b]:
                send[a:z] = self.params[name]  # padding stays zero
            requests.append(self.transport.iallgather(self.comm, send, bucket))
        self.reducer.active.set()  # the progress thread advances them
        try:
            for b, request in enumerate(requests):
                self.transport.wait(request)
                for name in self.reducer.names[b]:
                    self.stage.params[name][...] = self.stage.grads[name]  # views of the bucket
        finally:
            self.reducer.active.clear()

    def layer_sq_norms(self, skip: str | None = None) -> dict[int, float]:
        """Each layer's squared gradient norm over my pieces (float64, pairwise; tp: the pieces
        of parameters this tp rank counts; not `skip`, a tied weight's second copy). The grid's
        SUM adds the replicas' parts."""
        names = [n for n in self.grads if owned(n, self.stage.splits, self.stage.tp) and n != skip]
        return layer_sq_norms(self.grads, names)

    def whole_state(self, opt: Any, keep: bool) -> tuple[int, dict[str, dict[str, Array]]]:
        """Collective over the replicas: (step count, {slot: {name: whole tensor}}) of the
        optimizer made over my pieces; `keep` False (replicas that do not write): nothing is
        kept, {} is returned for the slots."""
        t, slots = opt.state_dict()
        out: dict[str, dict[str, Array]] = {slot: {} for slot in slots} if keep else {}
        for slot, pieces in slots.items():
            for b, (bucket, block) in enumerate(self._pairs()):
                xp = namespace_of(block)
                send = xp.zeros_like(block)
                for name, a, z in self.where[b]:
                    send[a:z] = pieces[name]
                full = xp.empty(bucket.size, dtype=block.dtype)
                self.transport.allgather_now(self.comm, send, full)
                if not keep:
                    continue
                offset = 0
                for name in self.reducer.names[b]:
                    p = self.stage.params[name]
                    out[slot][name] = full[offset : offset + p.size].reshape(p.shape)
                    offset += p.size
        return t, out

    @property
    def nbytes(self) -> int:
        """Bytes of my blocks (the reduce-scatter targets)."""
        return sum(int(s.nbytes) for s in self.reducer.shards)
