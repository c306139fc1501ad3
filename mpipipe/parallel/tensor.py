"""Tensor parallelism (Megatron-LM, SC21): a stage's layers split across the ranks of a tp group.

What is split, and how (`Split`): the fused qkv and the first MLP matrix by columns
(column-parallel: each rank computes its heads' q, k, v and its quarter of the hidden units),
the attention output projection and the second MLP matrix by rows (row-parallel: each rank
multiplies its slice of the hidden units and the partial products are summed), the token
embedding and the LM head by vocabulary rows/columns. LayerNorms, the position embedding and the
biases of row-parallel layers are replicated: every rank of the group holds them whole and, since
their inputs and output gradients are the same on every rank, computes the same gradient.

Collectives (`TensorGroup.all_reduce`): Megatron's conjugate operators. `f` is the identity in
forward and an all-reduce of the input gradient in backward (before a column-parallel layer);
`g` is an all-reduce in forward and the identity in backward (after a row-parallel layer). A
transformer block has two of each: 2 all-reduces in forward and 2 in backward per micro-batch.
The vocabulary-parallel embedding adds one in forward; the parallel cross-entropy two (the row
maxima, MAX; then the sums of exponentials with the target logits, SUM) and the head's `f` one.
All of them run inside F or B actions (weight gradients, W, use only local data), and every
rank of a tp group runs the same action list (the group shares a stage and a replica, hence a
plan row), so the group's collectives are issued in the same order everywhere by construction;
a hand-written --schedule-file gives one line per pipeline rank, which all ranks of its tp
group run, so the same holds for it.

The all-reduce is blocking from the caller's point of view (the next kernel needs its result),
but it goes through the rank's one transport like every other collective: a host array is
reduced in place by MPI, a device array directly (CUDA-aware MPI, after the producing kernels)
or staged through pinned host memory, and the wait polls with the transport's back-off (no
MPICH busy-spin on oversubscribed nodes). 16-bit arrays are summed in a float32 copy.

Sequence parallelism (Korthikanti et al. 2022) replaces each all-reduce of the residual stream
by its two halves, same bytes: `reduce_scatter` (the row-parallel sums, leaving each rank its
token block: `Single` says which rows) and `all_gather` (the whole again, before a column-parallel
product); parallel/sequence.py says what runs where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mpi4py import MPI

from mpipipe.parallel.transport import Transport
from mpipipe.xp import Array, is_half, namespace_of, to_numpy


@dataclass(frozen=True)
class Split:
    """How a whole parameter is cut into tp shards: along `axis`, as `blocks` equal blocks (the
    fused qkv weight is [q | k | v]: 3 blocks), each block cut into `size` equal pieces; shard r
    is piece r of every block, in block order. Works on NumPy and CuPy arrays alike."""

    axis: int
    blocks: int = 1

    def shard(self, whole: Any, size: int, rank: int) -> Any:
        """Shard `rank` of `size` of the whole array (a copy)."""
        xp = namespace_of(whole)
        blocks = xp.split(whole, self.blocks, axis=self.axis)
        pieces = [xp.split(b, size, axis=self.axis)[rank] for b in blocks]
        return xp.ascontiguousarray(xp.concatenate(pieces, axis=self.axis))

    def join(self, shards: Sequence[Any]) -> Any:
        """The whole array from every rank's shard, in rank order (the inverse of `shard`)."""
        xp = namespace_of(shards[0])
        cut = [xp.split(s, self.blocks, axis=self.axis) for s in shards]
        blocks = [xp.concatenate([c[j] for c in cut], axis=self.axis) for j in range(self.blocks)]
        return xp.concatenate(blocks, axis=self.axis)


class TensorGroup(Protocol):
    """The ranks that share one stage's layers: their number, my index, and the collectives."""

    @property
    def size(self) -> int: ...
    @property
    def rank(self) -> int: ...
    def all_reduce(self, x: Array, op: str = "sum") -> Array:
        """The elementwise SUM (or MAX) of `x` over the group; may reuse `x`'s memory."""
        ...

    def all_gather(self, x: Array) -> Array:
        """Every rank's block joined in rank order, in memory order: my token block
        (B, T / tp, C) -> the whole (B, T, C) (sequence parallelism; see `Single`); new."""
        ...

    def reduce_scatter(self, x: Array) -> Array:
        """The SUM of `x` (B, T, C) over the group, cut in memory order into tp equal blocks:
        block `rank`, shaped (B, T / tp, C)."""
        ...


class Single:
    """No tensor parallelism: the group of one rank, whose collectives do nothing.

    A token block (sequence parallelism) is block `rank` of the (B, T, C) activation's B x T
    token rows in memory order (batch-major), shaped (B, T / tp, C): for one sample per
    micro-batch exactly the sequence cut in tp; for more, the samples' rows run on from one
    into the next (Megatron cuts a [T, B, C] layout along T; ours is the same cut on our
    [B, T, C] layout without the transposes: a contiguous slice, so the collectives copy
    nothing). Per-row layers (LayerNorm, bias, residual) do not mind which rows they get."""

    size, rank = 1, 0

    def all_reduce(self, x: Array, op: str = "sum") -> Array:
        return x

    def all_gather(self, x: Array) -> Array:
        return x

    def reduce_scatter(self, x: Array) -> Array:
        return x


SINGLE = Single()
_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


class TpGroup:
    """A tp communicator behind the rank's transport (see the module docstring)."""

    def __init__(self, comm: MPI.Comm, transport: Transport, spin_s: float | None = None) -> None:
        """`spin_s`: how long a wait spins before it backs off to sleeps (default the
        transport's, which the runtime sets by `transport.spin_for`: 1 ms when each rank has a
        core of its own, as an all-reduce of a small activation takes tens of microseconds and
        a sleep more; 50 us on an oversubscribed node, where spinning would steal the core of
        the rank it waits for)."""
        self.comm, self.transport, self.spin_s = comm, transport, spin_s
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.calls = 0  # all-reduces issued (tests count them per block and micro-batch)

    def all_reduce(self, x: Array, op: str = "sum") -> Array:
        self.calls += 1
        half = is_half(x.dtype)
        buf = x.astype("float32") if half else x
        if not buf.flags.c_contiguous:
            buf = buf.copy()
        self.transport.allreduce_now(self.comm, buf, _OPS[op], self.spin_s)
        return buf.astype(x.dtype) if half else buf

    def all_gather(self, x: Array) -> Array:
        self.calls += 1
        xp = namespace_of(x)
        send = xp.ascontiguousarray(x)  # (B, S, C) my token block (a no-op when contiguous)
        recv = xp.empty((x.shape[0], x.shape[1] * self.size, *x.shape[2:]), dtype=x.dtype)
        self.transport.allgather_now(self.comm, send, recv, self.spin_s)  # (B, T, C)
        return recv

    def reduce_scatter(self, x: Array) -> Array:
        self.calls += 1
        xp = namespace_of(x)
        half = is_half(x.dtype)
        if x.shape[1] % self.size:
            raise ValueError(
                f"reduce-scatter of a sequence of {x.shape[1]} over {self.size} tp ranks: the "
                f"sequence must be a multiple of --tp"
            )
        send = xp.ascontiguousarray(x, dtype="float32" if half else x.dtype)  # (B, T, C)
        recv = xp.empty((x.shape[0], x.shape[1] // self.size, *x.shape[2:]), dtype=send.dtype)
        self.transport.reduce_scatter_now(self.comm, send, recv, MPI.SUM, self.spin_s)
        return recv.astype(x.dtype) if half else recv  # (B, S, C) my token block


def whole(
    params: dict[str, Any], splits: dict[str, Split], group: TensorGroup, comm: MPI.Comm | None
) -> dict[str, Any]:
    """Collective over the tp group: every parameter whole (host arrays, shards joined in rank
    order; replicated ones as they are). Every rank gets them (allgather): the tensor's whole
    size is held once per rank for as long as the caller keeps it."""
    if group.size == 1 or comm is None:
        return dict(params)
    out = {}
    for name in sorted(params):
        value = params[name]
        split = splits.get(name)
        out[name] = value if split is None else split.join(comm.allgather(to_numpy(value)))
    return out


def owned(name: str, splits: dict[str, Split], group: TensorGroup) -> bool:
    """Does this rank count `name` in sums over the group (norms, parameter counts)? Every rank
    its shards; the group's rank 0 the replicated parameters (the others hold equal copies)."""
    return name in splits or group.rank == 0


def check(heads: int, d_model: int, vocab: int, tp: int) -> str | None:
    """What --tp `tp` cannot split in this GPT, with the fix; None if it can."""
    if heads % tp:
        return (
            f"--tp {tp} does not divide --heads {heads} (the heads are split across the tp "
            f"group: choose a --tp dividing {heads}, or --heads a multiple of {tp})"
        )
    if d_model % tp:  # heads % tp == 0 and d_model % heads == 0 imply it; said for clarity
        return f"--tp {tp} does not divide --d-model {d_model} (choose a divisor of {d_model})"
    if vocab % tp:
        padded = -(-vocab // (64 * tp)) * 64 * tp
        return (
            f"--tp {tp} does not divide the vocabulary {vocab} (the embedding and head are "
            f"split by vocabulary rows: pad it with --vocab {padded}, as GPT-2 models do)"
        )
    return None
