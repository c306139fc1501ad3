"""Messages between pipeline neighbours: tags (deterministic, unique within a step, bounded),
the link to the pipeline's communicator, and receives posted again every step.

The messages themselves travel through the rank's transport (parallel/transport.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpipipe.parallel.transport import Transport
    from mpipipe.xp import Array

KINDS = {"A": 0, "G": 1}  # activation (forward), gradient (backward)


def tag(kind: str, mb: int, stage: int, n_stages: int, m: int) -> int:
    """Unique per (kind, micro-batch, receiving stage) within one step; < 2 * n_stages * m."""
    return (KINDS[kind] * n_stages + stage) * m + mb


def max_tag(n_stages: int, m: int) -> int:
    return 2 * n_stages * m - 1


class Reposted:
    """A receive posted once per step on the same buffer, peer and tag (see
    `Transport.recv_init`): `start()` posts it, `request` is what to wait on until the next."""

    def __init__(self, post: Callable[[], Any] | None, persistent: Any = None) -> None:
        self.post, self.request = post, persistent

    def start(self) -> None:
        if self.post is None:  # MPI_Start: no arguments to convert, no request to allocate
            self.request.Start()
        else:
            self.request = self.post()


class Link:
    """The point-to-point half of a transport, bound to one communicator (the pipeline's)."""

    def __init__(self, transport: Transport, comm: MPI.Comm) -> None:
        self.transport, self.comm = transport, comm
        # called between all actions and in every wait: the transport's own, one call less
        self.wait, self.waitall, self.progress = (
            transport.wait,
            transport.waitall,
            transport.progress,
        )

    def isend(self, buf: Array, dest: int, tag: int) -> Any:
        return self.transport.isend(self.comm, buf, dest, tag)

    def irecv(self, buf: Array, source: int, tag: int) -> Any:
        return self.transport.irecv(self.comm, buf, source, tag)

    def recv_init(self, buf: Array, source: int, tag: int) -> Reposted:
        return self.transport.recv_init(self.comm, buf, source, tag)
