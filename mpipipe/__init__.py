"""mpipipe: pipeline-parallel training over MPI, with schedules as data and explicit kernels.

Python API (call on every rank; a single process works too):

    from mpipipe import TrainConfig, train
    result = train(TrainConfig(layers=4, steps=100))
"""

from __future__ import annotations

from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError, ScheduleError
from mpipipe.layers import (
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
from mpipipe.model import LayerSpec, Model, gpt, mlp

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
