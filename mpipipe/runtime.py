"""The rank runtime: everything one rank needs to run steps, built once from (job, grid).

    Device      where my arrays live (NumPy or my GPU), chosen from my node-local rank
    Transport   the ONE policy for messages and collectives (parallel/transport.py)
    Stage       my chunks, the loss, parameters by global name (stage.py)
    Executors   the lowered training plan and its forward-only twin (executor.py)
    GradReducer my stage's gradient buckets over my replicas (parallel/data_parallel.py)
    ZeroShards  with --zero 1 and dp > 1: my replica's pieces of the optimizer (parallel/zero.py)
    Tie         with --tie-embeddings yes: the weight my first/last stage shares (tied.py)
    TpGroup     with --tp: the ranks that split my stage's layers (parallel/tensor.py)

train, `--dry-run` (placement and policy only: it builds no model), eval, generate and the
`--partition time` profiler all start here; nothing else decides backends or transports.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from threadpoolctl import threadpool_limits

from mpipipe import mbthreads, rowwise, schedule
from mpipipe.emulate import EmulatedCompute
from mpipipe.errors import ConfigError
from mpipipe.executor import Executor, MicroBatches
from mpipipe.job import Job
from mpipipe.parallel.cuda_aware import verdict
from mpipipe.parallel.data_parallel import GradReducer
from mpipipe.parallel.grid import Grid
from mpipipe.parallel.sequence import SequenceGrads
from mpipipe.parallel.staging import CupyOps, DeviceOps, HostOps
from mpipipe.parallel.tensor import SINGLE, TensorGroup, TpGroup
from mpipipe.parallel.transport import Transport, spin_for
from mpipipe.parallel.zero import ZeroShards
from mpipipe.rowwise import blas_threads, use_threads
from mpipipe.stage import Compute, Stage
from mpipipe.tied import EMBED, Tie
from mpipipe.xp import dtype_of, get, gpu_count, pick_device, use_device


@dataclass(frozen=True)
class Device:
    """Where this rank computes: the array module, the compute dtype and a name for people."""

    backend: str  # numpy | cupy
    xp: ModuleType
    dtype: Any
    name: str  # cpu | cuda:N


def share_cores(local_size: int, env: Mapping[str, str] = os.environ) -> int | None:
    """BLAS threads for one of `local_size` ranks on a node: the cores the launcher bound this
    rank to, or the node's cores divided among its ranks when it bound none (1 when
    oversubscribed). Returns None, changing nothing, when the user chose (OMP_NUM_THREADS and
    friends). Done at run time with threadpoolctl, so importing mpipipe changes no setting."""
    if any(v in env for v in rowwise.USER_THREADS):
        return None
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = os.cpu_count() or 1
    threads = mine if mine and mine < cores else max(1, cores // max(1, local_size))
    threadpool_limits(threads, user_api="blas")
    return threads


# glibc's mallopt parameters, and the size up to which freed host memory stays in the heap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BYTES = 1 << 30
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def reuse_host_memory(env: Mapping[str, str] = os.environ) -> bool:
    """Keep freed host arrays in the C heap for the next micro-batch instead of handing them
    back to the kernel. glibc serves large requests with mmap and trims the heap's free top, so
    a step's temporaries (activations, gradients, attention scores: MiBs each) were mapped,
    page-faulted and unmapped again every micro-batch: a third of a 1-rank default step was
    kernel time (measured: `benchmarks/bench_step.py`). Raising glibc's mmap and trim
    thresholds to 1 GiB (`mallopt`) keeps them; a step reaches the same peak every time, so the
    heap holds no more than that peak. Returns False, changing nothing, where the user set
    glibc's MALLOC_*_ variables or GLIBC_TUNABLES, or where the C library is not glibc."""
    if any(v in env for v in (*MALLOC_SETTINGS, "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BYTES) and mallopt(M_TRIM_THRESHOLD, HEAP_BYTES))


def place(job: Job, grid: Grid) -> Device:
    """Choose and select this rank's device from its node-local rank; raises ConfigError (e.g.
    more ranks than GPUs on a node) so that `agree` can stop every rank together. Ranks that
    share a node's cores share them out (see `share_cores`), and the rank's element-wise work
    runs on as many threads as its BLAS (`rowwise`); freed host memory is kept for
    reuse (see `reuse_host_memory`)."""
    blas = share_cores(grid.local_size)
    use_threads(blas if blas is not None else blas_threads())  # element-wise work: the same
    reuse_host_memory()
    xp, dtype = get(job.backend), dtype_of(job.cfg.dtype)
    if job.backend != "cupy":
        return Device("numpy", xp, dtype, "cpu")
    try:
        index = pick_device(
            grid.local_rank, grid.local_size, gpu_count(), job.cfg.share_gpus == "yes"
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    use_device(index)
    return Device("cupy", xp, dtype, f"cuda:{index}")


def make_transport(job: Job, device: Device, local_size: int = 1) -> tuple[Transport, str]:
    """The transport for this device and MPI library, and why: host arrays go as they are;
    device arrays directly when MPI is CUDA-aware, else staged through pinned host memory.
    Waits spin as long as one of `local_size` ranks on a node may (`spin_for`)."""
    spin = spin_for(local_size)
    if device.backend != "cupy":
        return Transport(HostOps(), spin_s=spin), "host arrays: plain MPI"
    aware, why = verdict(job.cfg.cuda_aware)
    ops: DeviceOps = CupyOps()
    transport = Transport(ops, aware, spin_s=spin)
    return transport, f"device buffers {transport.policy} ({why})"


class Runtime:
    """One rank's device, transport, stage, executors and gradient reducer."""

    def __init__(self, job: Job, grid: Grid, device: Device, training: bool = True) -> None:
        cfg, plan = job.cfg, job.plan
        self.job, self.grid, self.device = job, grid, device
        self.xp, self.dtype = device.xp, device.dtype
        self.rank = grid.stage_rank  # my rank within my pipeline
        self.transport, self.policy = make_transport(job, device, grid.local_size)
        self.tp: TensorGroup = SINGLE
        if grid.tp_comm is not None:
            self.tp = TpGroup(grid.tp_comm, self.transport)
        sp = cfg.sequence_parallel
        compute: Any = Compute(cfg.seed, device.dtype, device.xp, cfg.recompute, self.tp, sp)
        if job.emulated is not None:
            compute = EmulatedCompute(compute, job.emulated, cfg.micro_batch)
        self.stage = Stage(job.model, plan.stages[self.rank], job.bounds, compute, self.tp)
        self.tie: Tie | None = None  # before the reducer: a shared weight is bucketed once
        if job.model.meta.get("tied"):
            first, last = plan.owner(0)[0], plan.owner(plan.n_stages - 1)[0]
            n = len(job.model.layers)
            self.tie = Tie(self.stage, n, first, last, grid.pp_comm, self.transport)
        self.reducer: GradReducer | None = None
        self.zero: ZeroShards | None = None  # --zero 1 with dp 1: nothing to shard
        if training and grid.dp > 1:
            sharded = cfg.zero == 1
            self.reducer = GradReducer(
                self.stage,
                grid.dp_comm,
                self.transport,
                int(cfg.bucket_mb * 2**20),
                cfg.overlap == "on",
                shards=grid.dp if sharded else 1,
            )
            if sharded:
                self.zero = ZeroShards(self.stage, self.reducer, grid.dp_comm, self.transport)
        self.p2p = self.transport.link(grid.pp_comm)
        self.loss_scale = 1.0 / (plan.microbatches * grid.dp)  # the mean over the global batch
        self.train_exec = self._executor(plan, self.loss_scale, self.reducer) if training else None
        self.eval_exec = self._executor(schedule.forward_only(plan), None, None)
        self.first = 0 in self.stage.ids
        self.last = plan.n_stages - 1 in self.stage.ids
        self.last_rank = plan.owner(plan.n_stages - 1)[0]  # my pipeline's last stage

    def _executor(self, plan: schedule.Plan, scale: float | None, reducer: Any) -> Executor:
        threads = mbthreads.threads_for(
            self.job, self.grid.world.Get_size(), self.device.backend, rowwise.threads()
        )
        kind: Any = Executor
        kw: dict[str, Any] = {}
        if threads:
            kind, kw = mbthreads.MicroBatchThreads, {"threads": threads}
        return kind(
            schedule.lower(plan),
            self.rank,
            self.stage,
            self.job.model,
            self.p2p,
            self.job.cfg.micro_batch,
            self.dtype,
            self.xp,
            scale,
            on_layer_final=self._on_layer_final(reducer),
            **kw,
        )

    def _on_layer_final(self, reducer: Any) -> Callable[[int], None] | None:
        """What runs once a layer's weight gradients are final: the sequence-parallel sums over
        the tp group (parallel/sequence.py), then the data-parallel bucket (`_layer_final`:
        a tied layer's waits for `finish_tie`)."""
        hooks: list[Callable[[int], None]] = []
        if self.stage.partial:
            hooks.append(SequenceGrads(self.stage, self.tp))
        if reducer is not None or self.tie is not None:
            hooks.append(self._layer_final)
        if len(hooks) < 2:
            return hooks[0] if hooks else None

        def both(layer: int) -> None:
            for hook in hooks:
                hook(layer)

        return both

    @property
    def tied_copy(self) -> str | None:
        """The head's copy of a tied weight held here (counted and stored once: elsewhere)."""
        return self.tie.copy if self.tie is not None else None

    @property
    def aliases(self) -> dict[str, str] | None:
        """What a checkpoint load reads under another name: a tied head's copy, the embedding."""
        return {self.tie.copy: EMBED} if self.tie is not None and self.tie.copy else None

    def _layer_final(self, i: int) -> None:
        """Global layer i's weight gradients are final: to the reducer, unless a tied layer
        (held until `finish_tie`)."""
        if (self.tie is None or not self.tie.hold(i)) and self.reducer is not None:
            self.reducer.layer_ready(i)

    def finish_tie(self) -> None:
        """After all W work of a step: the tied gradient summed, its layers to the reducer."""
        if self.tie is not None:
            for i in self.tie.finish():
                if self.reducer is not None:
                    self.reducer.layer_ready(i)

    @property
    def rows(self) -> range:
        """My replica's disjoint slice of every global batch (rows of the batch): the union of
        the replicas' slices is the batch the single-process run sees."""
        per = self.job.plan.microbatches * self.job.cfg.micro_batch
        return range(self.grid.replica * per, (self.grid.replica + 1) * per)

    @property
    def reads_data(self) -> bool:
        """Only the first stage (inputs) and the last (targets) touch data."""
        return self.first or self.last

    def micro_batches(self, x: Any, y: Any) -> MicroBatches:
        """My replica's rows of a batch (host arrays, `self.rows` of the global batch) split
        into micro-batches and moved to my device; only the first stage gets inputs, only the
        last targets."""
        if not self.reads_data:
            return MicroBatches(None, None)
        m, b = self.job.plan.microbatches, self.job.cfg.micro_batch

        def split(a: Any) -> Sequence[Any]:
            return [self.xp.asarray(a[i * b : (i + 1) * b]) for i in range(m)]

        return MicroBatches(split(x) if self.first else None, split(y) if self.last else None)

    def close(self) -> None:
        for ex in (self.train_exec, self.eval_exec):
            if ex is not None:
                ex.close()  # e.g. the micro-batch threads' workers
        if self.reducer is not None:
            self.reducer.close()
        if self.tie is not None:
            self.tie.close()
        self.transport.close()  # the executors' persistent receives
