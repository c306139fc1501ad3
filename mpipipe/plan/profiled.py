"""Profiled compute: the planner's F, B and W of the embedding, a block and the head, timed on
this machine with the runtime's own layers at a layout's micro-batch and tensor-parallel share
(`plan --profile`; `plan --validate` times them afresh right before each real-compute run, so
that profile and run see the same load).

A roofline (matmul FLOPs at the calibrated rate plus bytes at the copy bandwidth) misses what
dominates small shapes on a CPU: NumPy's fixed cost per call, transcendental functions (GELU's
tanh, the softmax's exp) that run far below the copy bandwidth, temporaries. Timing the real
layers measures all of it. A tensor-parallel rank is timed as rank 0 of a group whose
collectives return their input (the shard's compute only; the planner adds the all-reduces from
the link model, as for the roofline). Each time is the median of `repeats` runs after a warm-up:
validation compares with median step times, so both see the same machine. The loss (softmax
cross-entropy) belongs to the head's F, as the executor runs it at the end of the last F.

The optimizer is timed the same way: the runtime's own (optim.make) stepping a block's (shard of)
parameters, as seconds per parameter; a copy-bandwidth roofline of its ~7 streams misses NumPy's
temporaries (3x on this machine for AdamW).
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

KINDS = ("embed", "block", "head")


class _Shard:
    """Tensor-parallel rank 0 of `size` ranks whose collectives cost nothing (the planner
    prices them from the link model)."""

    rank = 0

    def __init__(self, size: int) -> None:
        self.size = size

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        return x

    def all_gather(self, x: Any) -> Any:  # pragma: no cover - sequence parallelism only
        raise NotImplementedError("plan --profile times no sequence parallelism")

    reduce_scatter = all_gather


class Profile:
    """Seconds of F, B, W per kind of layer for one micro-batch, measured once per
    (micro-batch, tp) and cached."""

    def __init__(self, d_model: int, heads: int, seq_len: int, vocab: int, dtype: str,
                 repeats: int = 7) -> None:  # fmt: skip
        self.shape = (d_model, heads, seq_len, vocab)
        self.dtype, self.repeats = dtype, repeats
        self.cache: dict[tuple[int, int], dict[str, tuple[float, float, float]]] = {}
        self.rates: dict[tuple[str, int], float] = {}

    def optimizer_rate(self, optimizer: str, tp: int) -> float:
        """Seconds per parameter of the runtime's `optimizer` step on a block's tp shard (the
        median of `repeats` steps after one)."""
        key = (optimizer, tp)
        if key not in self.rates:
            self.rates[key] = self._optimizer(optimizer, tp)
        return self.rates[key]

    def _optimizer(self, optimizer: str, tp: int) -> float:
        import time

        from threadpoolctl import threadpool_limits

        from mpipipe import optim
        from mpipipe.config import TrainConfig
        from mpipipe.layers import Init
        from mpipipe.model import gpt
        from mpipipe.xp import dtype_of

        c, h, t, v = self.shape
        block = gpt(1, c, h, t, v).layers[1].build(Init.for_layer(0, 1, dtype_of(self.dtype), np,
                                                                  _Shard(tp)))  # fmt: skip
        params = block.params
        opt = optim.make(optimizer, params, TrainConfig(dtype=self.dtype))
        grads = {k: np.full_like(x, 1e-3) for k, x in params.items()}
        times = []
        with threadpool_limits(1, user_api="blas"):
            for _ in range(self.repeats + 1):
                t0 = time.perf_counter()
                opt.step(grads, 1e-4)
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) / sum(int(x.size) for x in params.values())

    def times(self, micro_batch: int, tp: int) -> dict[str, tuple[float, float, float]]:
        key = (micro_batch, tp)
        if key not in self.cache:
            self.cache[key] = self._measure(micro_batch, tp)
        return self.cache[key]

    def _measure(self, b: int, tp: int) -> dict[str, tuple[float, float, float]]:
        from threadpoolctl import threadpool_limits

        from mpipipe.kernels.loss import cross_entropy_forward_backward
        from mpipipe.kernels.vocab_parallel import parallel_cross_entropy_forward_backward
        from mpipipe.layers import Init
        from mpipipe.model import gpt
        from mpipipe.profile import time_layer
        from mpipipe.xp import dtype_of

        c, h, t, v = self.shape
        model = gpt(1, c, h, t, v)
        dtype, group = dtype_of(self.dtype), _Shard(tp)
        rng = np.random.default_rng(0)
        targets = rng.integers(0, v // tp, size=(b, t))

        def loss(y: Any) -> Any:
            if tp == 1:
                return cross_entropy_forward_backward(y, targets, 1.0)[1]
            return parallel_cross_entropy_forward_backward(y, targets, 1.0, 0, group.all_reduce)[1]

        out: dict[str, tuple[float, float, float]] = {}
        with threadpool_limits(1, user_api="blas"):  # one rank per core, as validate runs them
            for i, kind in enumerate(KINDS):
                layer = model.layers[i].build(Init.for_layer(0, i, dtype, np, group))
                if kind == "embed":
                    x = rng.integers(0, v, size=(b, t))
                else:
                    x = rng.normal(size=(b, t, c)).astype(dtype)
                out[kind], _ = time_layer(
                    layer, x, loss if kind == "head" else None, np, self.repeats, statistics.median
                )
        return out
