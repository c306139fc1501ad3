"""Everything decided before heavy work: validated config, layout, model recipe, checked plan.

`prepare` runs on every rank and is cheap (no parameters, no data read); `agree` makes a problem
found on any rank stop every rank together with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from mpi4py import MPI

from mpipipe import schedule
from mpipipe.config import TrainConfig
from mpipipe.data import BYTES_VOCAB, TokenDataset, open_dataset
from mpipipe.emulate import Emulation, body_per_stage
from mpipipe.errors import ConfigError
from mpipipe.model import Model, gpt, mlp
from mpipipe.parallel.p2p import max_tag
from mpipipe.partition import split, uniform
from mpipipe.profile import action_times
from mpipipe.schedule import collectives
from mpipipe.xp import dtype_of, get, resolve_backend

if TYPE_CHECKING:
    from mpipipe.parallel.grid import Grid

T = TypeVar("T")


def build_model(cfg: TrainConfig) -> Model:
    """The model `cfg` names (a recipe: nothing is allocated); vocabulary --vocab, else bytes."""
    vocab = cfg.vocab or BYTES_VOCAB
    if cfg.is_gpt:
        shards = cfg.tp if cfg.sequence_parallel else 1
        tied = cfg.tie_embeddings == "yes"
        return gpt(
            cfg.layers, cfg.d_model, cfg.heads, cfg.seq_len, vocab, shards, tied, cfg.attention
        )
    return mlp(cfg.layers, cfg.d_model, cfg.seq_len, vocab)


@dataclass
class Job:
    cfg: TrainConfig  # with pp and dp filled in
    model: Model
    plan: schedule.Plan
    report: schedule.Report  # the checker's verdict and simulation (emulated or unit costs)
    dataset: Any
    emulation: Emulation | None = None
    emulated: schedule.Costs | None = None  # seconds per action and virtual stage, if emulated
    bounds: list[range] = field(default_factory=list)  # global layers of each virtual stage
    backend: str = "numpy"  # resolved from --backend
    layer_costs: list[float] | None = None  # what the partition balanced (params or seconds)
    layer_clock: str = ""  # what timed the layers, for --partition time and --schedule auto
    auto_costs: str = ""  # what --schedule auto's synthesizer optimised for, in words
    measured: schedule.Costs | None = None  # seconds per action and virtual stage, if timed
    layer_actions: list[tuple[float, float, float]] | None = None  # (F, B, W) s per layer, timed


def prepare(
    cfg: TrainConfig, world_size: int, model: Model | None = None, dataset: Any = None
) -> Job:
    """All validation, cheap and identical on every rank; raises ConfigError with the fix. The
    data's metadata is read (not its tokens) and fills in --vocab when it was not given."""
    cfg = cfg.validate()
    if dataset is None:
        dataset = open_dataset(cfg)
        cfg = cfg.replace(vocab=cfg.vocab or dataset.vocab)
    elif hasattr(dataset, "check"):
        dataset.check()
    if cfg.tp > 1:  # the vocabulary is known now (from the data, when not given)
        from mpipipe.parallel.tensor import check  # noqa: PLC0415

        if problem := check(cfg.heads, cfg.d_model, cfg.vocab or BYTES_VOCAB, cfg.tp):
            raise ConfigError(problem)
    model = model or build_model(cfg)
    body = [s.body for s in model.layers]
    hand = _read_schedule_file(cfg) if cfg.schedule_file else None
    if hand is not None:
        if cfg.pp is not None and cfg.pp != hand.pp:
            raise ConfigError(
                f"--schedule-file {cfg.schedule_file} has {hand.pp} rank lines but --pp is "
                f"{cfg.pp} (write one line per pipeline rank)"
            )
        cfg = cfg.replace(pp=hand.pp)
    auto = hand is None and cfg.schedule == "auto"
    if hand:
        chunks = len(hand.stages[0])
    else:
        chunks = 1 if auto else schedule.chunks_for(cfg.schedule, cfg.virtual_stages)
    if cfg.pp is not None:  # stages vs layers first: the same answer on any number of ranks
        uniform(body, cfg.pp * chunks, chunks)
    cfg = cfg.layout(world_size, max_pp=sum(body) // chunks)
    assert cfg.pp is not None
    costs = None
    if cfg.partition == "params":
        costs = [float(s.params) for s in model.layers]
        if not all(costs):
            raise ConfigError(
                "--partition params needs every LayerSpec's params count "
                "(built-in models have them; or use --partition uniform/time)"
            )
    emulation = Emulation.parse(cfg.emulate) if cfg.emulate else None
    auto_costs = ""
    if auto:  # emulated costs are known now; measured ones replace unit costs in finalize()
        scale, auto_costs = synth_costs(cfg, model, costs, emulation, None)
        plan = _synthesize(cfg, body, scale)
    else:
        plan = hand or schedule.build(cfg.schedule, cfg.pp, cfg.microbatches, cfg.virtual_stages)
    _check_plan(cfg, plan)
    chunks = len(plan.stages[0])
    bounds = split(body, plan.n_stages, chunks, cfg.partition, costs)  # time: see finalize()
    try:
        backend, _ = resolve_backend(cfg.backend)
        get(backend)  # CuPy importable, when asked for
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    job = Job(
        cfg,
        model,
        plan,
        schedule.check(plan),
        dataset,
        emulation,
        None,
        bounds,
        backend=backend,
        layer_costs=costs,
        auto_costs=auto_costs,
    )
    _simulate(job)
    return job


def _check_plan(cfg: TrainConfig, plan: schedule.Plan) -> None:
    """What a plan must satisfy beyond the checker: one collective order per tp group, and
    message tags within what every MPI allows."""
    held = collectives.holding(cfg.tp, cfg.sequence_parallel)
    collectives.check(collectives.rows(plan, cfg.tp), held)  # before anything runs
    top = max_tag(plan.n_stages, cfg.microbatches)
    if top > 32767:  # the least MPI.TAG_UB the standard guarantees
        raise ConfigError(
            f"--microbatches {cfg.microbatches} with {plan.n_stages} stages needs "
            f"message tags up to {top} > 32767 (use fewer micro-batches)"
        )


def _synthesize(cfg: TrainConfig, body: list[bool], costs: Any) -> schedule.Plan:
    """--schedule auto: the synthesizer's plan under --memory for `costs` (see `synth_costs`),
    on one chunk per rank or a V where the layers allow two chunks per rank."""
    from mpipipe.schedule import synth  # noqa: PLC0415

    assert cfg.pp is not None and cfg.memory is not None
    chunks = [1] + ([2] if sum(body) >= 2 * cfg.pp else [])
    names = sorted(schedule.SCHEDULES)
    return synth.for_training(
        cfg.pp, cfg.microbatches, cfg.memory, chunks, names, schedule.build, costs
    )


def synth_costs(
    cfg: TrainConfig,
    model: Model,
    layer_costs: list[float] | None,
    emulation: Emulation | None,
    actions: list[tuple[float, float, float]] | None,
) -> tuple[Any, str]:
    """What --schedule auto optimises for, and its description: the emulated costs, else the
    measured (F, B, W) seconds of every layer (`actions`), of the layers each virtual stage
    would hold (split as the job splits, for each chunk count); else equal stages with B = 2F."""
    from mpipipe.schedule import synth  # noqa: PLC0415

    if emulation is None and actions is None:
        return synth.TRAIN_COSTS, "equal stages, F:B:W = 1:2:1 (not yet measured)"
    body = [s.body for s in model.layers]

    def scale(pp: int, v: int) -> schedule.Costs:
        bounds = split(body, pp * v, v, cfg.partition, layer_costs)
        if emulation is not None:
            return emulation.costs(body_per_stage(model, bounds), cfg.micro_batch)
        assert actions is not None
        f, b, w = ([sum(actions[i][j] for i in r) for r in bounds] for j in range(3))
        return schedule.Costs(f, b, w)

    return scale, ("the emulated costs" if emulation else "each layer's measured F, B, W")


def _simulate(job: Job) -> None:
    """The checker's report for the job's plan, with the emulated costs of its partition."""
    if job.emulation:
        per_stage = body_per_stage(job.model, job.bounds)
        job.emulated = job.emulation.costs(per_stage, job.cfg.micro_batch)
    job.report = schedule.check(job.plan, job.emulated or job.measured)


def finalize(job: Job, comm: MPI.Comm, xp: ModuleType | None = None) -> Job:
    """Decisions that need this machine's timings: --partition time and --schedule auto (when
    computing for real) have rank 0 time every layer's F, B and W on its device (`xp`: the
    array module of the rank's device, NumPy by default) and broadcast the times, so every rank
    splits the model, and synthesizes the schedule, alike. Other jobs are final already."""
    cfg = job.cfg
    auto = cfg.schedule == "auto" and not cfg.schedule_file and job.emulation is None
    if cfg.partition != "time" and not auto:
        return job
    result: Any = None
    if comm.Get_rank() == 0:
        try:
            result = action_times(
                job.model, cfg.micro_batch, dtype_of(cfg.dtype), xp or get("numpy")
            )
        except ValueError as e:
            result = str(e)
    result = comm.bcast(result, root=0)
    if isinstance(result, str):
        raise ConfigError(result)
    actions, job.layer_clock = result
    job.layer_actions = actions
    body = [s.body for s in job.model.layers]
    if cfg.partition == "time":
        job.layer_costs = [sum(t) for t in actions]
    if auto:
        scale, job.auto_costs = synth_costs(cfg, job.model, job.layer_costs, None, actions)
        job.plan = _synthesize(cfg, body, scale)
        _check_plan(cfg, job.plan)
        job.measured = scale(job.plan.pp, len(job.plan.stages[0]))
    job.bounds = split(body, job.plan.n_stages, len(job.plan.stages[0]), cfg.partition,
                       job.layer_costs)  # fmt: skip
    _simulate(job)
    return job


def _read_schedule_file(cfg: TrainConfig) -> schedule.Plan:
    path = Path(str(cfg.schedule_file))
    if not path.is_file():
        raise ConfigError(f"--schedule-file {path}: no such file (one line of actions per rank)")
    try:
        return schedule.from_text(path.read_text(), cfg.microbatches, name=path.name)
    except ValueError as e:
        raise ConfigError(f"--schedule-file {path}: {e}") from None


def scan_tokens(job: Job, grid: Grid) -> None:
    """Refuse a token id outside the vocabulary before any heavy work: the ranks that read data
    (the first and last stage of every replica) each scan their share of the files once. Call
    through `agree`, so a bad id found by one rank stops every rank with its message."""
    if not isinstance(job.dataset, TokenDataset) or job.cfg.vocab is None:
        return
    plan = job.plan
    readers = sorted({plan.owner(0)[0], plan.owner(plan.n_stages - 1)[0]})
    if grid.stage_rank in readers and grid.tp_rank == 0:  # a tp group reads the same rows
        part = grid.replica * len(readers) + readers.index(grid.stage_rank)
        job.dataset.scan(part, grid.dp * len(readers), job.cfg.vocab)


def agree(comm: MPI.Comm, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raised ConfigError anywhere, raise it everywhere.

    One small collective, so a rank that alone finds a problem (a file missing on its node) makes
    every rank stop together instead of leaving the others to hang.
    """
    try:
        job, err = work(), None
    except ConfigError as e:
        job, err = None, str(e)
    errors = comm.allgather(err)
    bad = [r for r, e in enumerate(errors) if e]
    if bad:
        msg = errors[bad[0]]
        if len(bad) < comm.size:
            msg += f" [on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}]"
        raise ConfigError(msg)
    return job  # type: ignore[return-value]


def describe(job: Job, layout: list[tuple[int, int, int, str, int]]) -> str:
    """What rank 0 prints at start: model, grid, schedule, stages and where every rank runs."""
    cfg, plan = job.cfg, job.plan
    names = [s.name for s in job.model.layers]
    parts = []
    for k, r in enumerate(job.bounds):
        text = (
            f"{k}:{names[r.start]}..{names[r.stop - 1]}" if len(r) > 1 else f"{k}:{names[r.start]}"
        )
        params = sum(job.model.layers[i].params for i in r)
        if params:
            text += f" ({params / 1e6:.2f}M"
            if cfg.partition == "time" and job.layer_costs:
                text += f", {sum(job.layer_costs[i] for i in r) * 1e3:.1f} ms"
            text += ")"
        parts.append(text)
    meta = job.model.meta
    what = (
        f"{meta['kind']} {meta['n_layer']}x{meta['d_model']}"
        + (f", vocabulary {meta['vocab']}" if meta.get("vocab") else "")
        + (", tied embeddings" if meta.get("tied") else "")
        if "kind" in meta
        else f"custom model of {len(job.model.layers)} layers"
    )
    sim = (
        f"emulated costs {cfg.emulate}"
        if job.emulation
        else "measured layer costs"
        if job.measured
        else "if F = B = W"
    )
    tp, first = (f" x tp={cfg.tp}", "tp, then ") if cfg.tp > 1 else ("", "")
    tp += " (sequence parallel)" if cfg.sequence_parallel else ""
    zero = ", ZeRO-1 (optimizer state sharded over dp)" if cfg.zero and (cfg.dp or 1) > 1 else ""
    lines = [
        f"mpipipe: {what} ({cfg.dtype}), pp={plan.pp} x dp={cfg.dp}{tp} ({first}"
        f"{cfg.rank_order} contiguous){zero}, schedule {plan.name}, {cfg.microbatches} "
        f"micro-batches of {cfg.micro_batch} per replica, peak stash {job.report.peak_stash}, "
        f"simulated bubble {job.report.bubble:.2f} ({sim})",
        f"stages ({cfg.partition} partition{', timed by ' * bool(job.layer_clock)}"
        f"{job.layer_clock}): {' | '.join(parts)}",
    ]
    if job.auto_costs:
        lines.append(
            f"schedule auto: synthesized under --memory {cfg.memory:g} for {job.auto_costs}, "
            f"{len(plan.stages[0])} chunk(s) per rank"
        )
    if cfg.partition == "time" and job.layer_costs:
        t = [sum(job.layer_costs[i] for i in r) for r in job.bounds]
        lines.append(
            f"estimated stage time (F+B+W per micro-batch): max/mean "
            f"{max(t) / (sum(t) / len(t)):.3f}"
        )
    by_stage: dict[int, list[str]] = {}
    for rank, stage, _replica, host, shard in sorted(layout, key=lambda t: (t[1], t[2], t[4])):
        by_stage.setdefault(stage, []).append(
            f"{rank}@{host}" + (f"/tp{shard}" if cfg.tp > 1 else "")
        )
    lines += [f"  stage {s}: ranks {' '.join(v)}" for s, v in sorted(by_stage.items())]
    return "\n".join(lines)
