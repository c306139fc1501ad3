"""Where a rank computes and how its arrays travel: the device from the node-local rank, and
the point-to-point transport that fits the backend and the MPI library."""

from __future__ import annotations

from mpi4py import MPI

from mpipipe.errors import ConfigError
from mpipipe.job import Job
from mpipipe.parallel.grid import Grid
from mpipipe.parallel.p2p import P2P
from mpipipe.xp import gpu_count, pick_device, use_device


def placement(job: Job, grid: Grid) -> str:
    """Choose and select this rank's device from its node-local rank: 'cpu' or 'cuda:N'."""
    if job.backend != "cupy":
        return "cpu"
    try:
        index = pick_device(
            grid.local_rank, grid.local_size, gpu_count(), job.cfg.share_gpus == "yes"
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    use_device(index)  # pragma: no cover - needs a GPU
    return f"cuda:{index}"  # pragma: no cover


def transport(job: Job, comm: MPI.Comm) -> P2P:
    """Plain P2P for host arrays; for GPU arrays, direct when MPI is CUDA-aware, else staged
    through pinned host buffers."""
    if job.backend != "cupy":
        return P2P(comm)
    from mpipipe.parallel.cuda_aware import verdict  # pragma: no cover - needs a GPU
    from mpipipe.parallel.staging import AwareP2P, CupyOps, StagedP2P

    aware, _ = verdict(job.cfg.cuda_aware)
    return (AwareP2P if aware else StagedP2P)(comm, CupyOps())
