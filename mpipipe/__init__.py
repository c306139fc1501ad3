"""mpipipe: pipeline-parallel training over MPI, with schedules as data and explicit kernels.

Python API (call on every rank; a single process works too):

    from mpipipe import TrainConfig, train
    result = train(TrainConfig(layers=4, steps=100))
"""

from __future__ import annotations

import os as _os


def _one_blas_thread_per_rank() -> None:
    """Ranks that share a node share its cores: unless the user chose, give each rank
    cores // local ranks BLAS threads (1 when oversubscribed). Must run before NumPy loads."""
    local = next(
        (
            _os.environ[k]
            for k in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
            if k in _os.environ
        ),
        None,
    )
    if local is None or not local.isdigit() or int(local) <= 1:
        return
    threads = str(max(1, (_os.cpu_count() or 1) // int(local)))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        _os.environ.setdefault(var, threads)


_one_blas_thread_per_rank()

from mpipipe.config import TrainConfig  # noqa: E402
from mpipipe.errors import ConfigError, ScheduleError  # noqa: E402
from mpipipe.layers import (  # noqa: E402
    GELU,
    MLP,
    Attention,
    Block,
    Embedding,
    Head,
    Init,
    LayerNorm,
    Linear,
    Sequential,
)
from mpipipe.model import LayerSpec, Model, gpt, mlp  # noqa: E402

__version__ = "0.1.0"


def train(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See mpipipe.trainer.train (imported lazily: it initialises MPI)."""
    from mpipipe.trainer import train as _train  # noqa: PLC0415

    return _train(*args, **kwargs)


__all__ = [
    "GELU",
    "MLP",
    "Attention",
    "Block",
    "ConfigError",
    "Embedding",
    "Head",
    "Init",
    "LayerNorm",
    "LayerSpec",
    "Linear",
    "Model",
    "ScheduleError",
    "Sequential",
    "TrainConfig",
    "gpt",
    "mlp",
    "train",
]
