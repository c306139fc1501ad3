"""Command line: `python -m mpipipe train | schedule`.

Run the default training:
    python -m mpipipe train                          # 1 process, the whole model on one rank
    mpiexec -n 4 python -m mpipipe train             # 4 pipeline stages
    mpiexec -n 4 python -m mpipipe train --config run.toml --schedule gpipe --steps 50
    sbatch jobs/train.sbatch                         # on a SLURM cluster (see the script header)

Scaling studies (launch the runs themselves: srun inside SLURM, else mpiexec):
    python -m mpipipe study --ranks 1,2,4,8 --mode strong --out results --emulate F=1,B=1,W=1

Plan a layout (predicted step time and memory of every layout; no MPI needed):
    python -m mpipipe plan --ranks 64 --machine dgx-h100 --model gpt2-xl --global-batch 512

Checkpoints and resuming:
    mpiexec -n 4 python -m mpipipe train --checkpoint-dir ckpt --save-every 100
    mpiexec -n 8 python -m mpipipe train --checkpoint-dir ckpt --resume auto   # any layout
    python -m mpipipe ckpt inspect ckpt | ckpt verify ckpt | ckpt export ckpt all.h5
    mpiexec -n 2 python -m mpipipe eval --resume ckpt
    python -m mpipipe generate --resume ckpt --prompt "def " --tokens 200

Data: token files (any tokenizer's ids, or bytes encoded here), then train on them:
    python -m mpipipe data encode notes/ 'src/**/*.py' -o corpus.bin
    python -m mpipipe data inspect corpus.bin
    mpiexec -n 4 python -m mpipipe train --data corpus.bin --pp 2
    mpiexec -n 16 python -m mpipipe train --model gpt2-small --data owt.bin --dry-run

What the machine offers (MPI library, CUDA-aware verdict, GPUs per rank):
    mpiexec -n 2 python -m mpipipe doctor

Inspect a schedule (no MPI needed):
    python -m mpipipe schedule --schedule 1f1b --pp 4 --microbatches 8
    python -m mpipipe schedule --file my_schedule.txt
    python -m mpipipe schedule --synthesize --pp 8 --microbatches 32 --memory 6 --costs F=1,B=2,W=1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpipipe import config as config_mod
from mpipipe.errors import ConfigError, NonFiniteError, ScheduleError
from mpipipe.flags import Parser as _Parser
from mpipipe.flags import parse_train
from mpipipe.schedule import SCHEDULES


def _schedule_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mpipipe schedule",
        description="Check a schedule, draw its timeline and simulate it (no MPI needed).",
    )
    train = config_mod.TrainConfig()  # the same defaults as train's
    p.add_argument(
        "--schedule",
        default=train.schedule,
        choices=sorted(SCHEDULES),
        help=f"the schedule (default: {train.schedule})",
    )
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks (default: 4)")
    p.add_argument(
        "--microbatches",
        type=int,
        default=train.microbatches,
        help=f"micro-batches (default: {train.microbatches}, as train's)",
    )
    p.add_argument("--virtual-stages", type=int, default=None, help="chunks per rank")
    p.add_argument(
        "--costs", default="F=1,B=1,W=1", help="per-action costs, e.g. F=1,B=2,W=1,latency=0.1"
    )
    p.add_argument("--file", help="a hand-written schedule: one line of actions per rank")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the Gantt chart (matplotlib)")
    # issue 17: compare every schedule under a memory cap, and synthesize one to measure
    p.add_argument("--memory", type=float, help="cap on stashed activations, micro-batches")
    p.add_argument("--synthesize", action="store_true", help="build the fastest under --memory")
    p.add_argument("--stage-costs", metavar="FILE", help="per-rank costs, 'F=..,B=..,W=..' lines")
    p.add_argument(
        "--profile",
        action="store_true",
        help="costs from timing every layer of train's model here (its defaults, or --config)",
    )
    p.add_argument("--config", metavar="FILE.toml", help="with --profile: the model of this file")
    return p


def cmd_schedule(argv: list[str]) -> int:
    from mpipipe import schedule
    from mpipipe.schedule.render import plot, summary, timeline

    args = _schedule_parser().parse_args(argv)
    try:
        costs = schedule.Costs.parse(args.costs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.memory is not None or args.synthesize:
        return _compare(args, costs)
    if args.file:
        plan = schedule.from_text(_read(args.file), name=args.file)
    else:
        plan = schedule.build(args.schedule, args.pp, args.microbatches, args.virtual_stages)
    report = schedule.check(plan, costs)
    print(
        f"{plan.name}: pp={plan.pp}, {plan.microbatches} micro-batches, "
        f"{len(plan.stages[0])} chunk(s) per rank, costs {args.costs}"
    )
    print(timeline(report))
    print(summary(report))
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _compare(args: argparse.Namespace, costs: Any) -> int:
    """`schedule --memory K [--synthesize]`: every schedule side by side, the synthesized one
    included (costs per rank's share of the model; a chunk costs its share of it)."""
    from mpipipe import schedule
    from mpipipe.schedule import synth
    from mpipipe.schedule.render import summary, timeline

    if args.memory is None:
        raise ConfigError("--synthesize needs --memory K (micro-batches of activations per rank)")
    if args.stage_costs and args.profile:
        raise ConfigError("--stage-costs and --profile both give the costs (choose one)")
    what = f"costs {args.stage_costs or args.costs} per rank's share"
    if args.stage_costs:
        try:
            costs = synth.read_stage_costs(_read(args.stage_costs), costs.latency)
        except ValueError as e:
            raise ConfigError(f"--stage-costs {args.stage_costs}: {e}") from None
    elif args.profile:
        costs, what = _profiled(args, costs.latency)
    rows, result = synth.compare(
        args.pp, args.microbatches, args.memory, costs, sorted(SCHEDULES), schedule.build
    )
    print(
        f"pp={args.pp}, {args.microbatches} micro-batches, memory cap {args.memory:g} "
        f"micro-batches, {what}"
    )
    if args.synthesize:
        print(timeline(result.report))
        print(summary(result.report))
    print(synth.side_by_side(rows, result, args.memory))
    return 0


def _profiled(args: argparse.Namespace, latency: float) -> tuple[Any, str]:
    """`schedule --profile`: every layer of train's model (its defaults, or --config's) timed
    here, as `train --schedule auto` times them; costs in milliseconds per virtual stage, with
    --costs' latency per hop."""
    from dataclasses import replace

    from mpipipe.job import prepare, synth_costs
    from mpipipe.profile import action_times
    from mpipipe.xp import dtype_of

    cfg, _ = parse_train(["--config", args.config] if args.config else [])
    cfg = cfg.replace(pp=args.pp, dp=1, tp=1, microbatches=args.microbatches)
    job = prepare(cfg.replace(schedule="1f1b", memory=None, virtual_stages=None), args.pp)
    try:
        actions, clock = action_times(job.model, job.cfg.micro_batch, dtype_of(job.cfg.dtype))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ms = [(f * 1e3, b * 1e3, w * 1e3) for f, b, w in actions]
    scale, _ = synth_costs(job.cfg, job.model, None, None, ms)
    one = scale(args.pp, 1)
    shares = ", ".join(
        f"F={one.of('F', k):.3g},B={one.of('B', k):.3g},W={one.of('W', k):.3g}"
        for k in range(args.pp)
    )
    meta = job.model.meta
    return (
        lambda pp, v: replace(scale(pp, v), latency=latency),
        f"costs in ms timed here by {clock} for {meta.get('kind', 'the model')} "
        f"{meta.get('n_layer')}x{meta.get('d_model')}, micro-batch {job.cfg.micro_batch} "
        f"(per rank, one chunk: {shares})",
    )


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError(f"--file {path}: {e.strerror} (give a text file of actions)") from None


NON_FINITE = 4  # a NaN or infinite loss or gradient norm stopped the run before the update
PREEMPTED = 75  # EX_TEMPFAIL: stopped early by SIGTERM/SIGUSR1 after saving; resume to continue


def _on_all_ranks(parse: Callable[[], Any], run: Callable[[Any, Any], int]) -> int:
    """Parse on every rank, agree on parse errors, run (it may return an exit status); a
    ConfigError anywhere ends every rank with status 2 and one message from rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        try:
            parsed, err = parse(), None
        except ConfigError as e:
            parsed, err = None, str(e)
        if any(comm.allgather(err)):  # flag errors end every rank together
            raise ConfigError(err or "invalid command line on another rank")
        status = run(parsed, comm)
    except ConfigError as e:
        if comm.Get_rank() == 0:
            print(f"mpipipe: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as e:  # found by every rank at once (after the step's reduction)
        if comm.Get_rank() == 0:
            print(f"mpipipe: error: {e}", file=sys.stderr, flush=True)
        return NON_FINITE
    return status


def cmd_train(argv: list[str]) -> int:
    from mpipipe.trainer import train

    def parse() -> tuple[config_mod.TrainConfig, bool]:
        return parse_train(argv, epilog=__doc__)

    def run(parsed: tuple[config_mod.TrainConfig, bool], comm: Any) -> int:
        cfg, dry = parsed
        if dry:
            dry_run(cfg, comm)
            return 0
        result = train(cfg, comm=comm)
        return PREEMPTED if result.preempted in ("SIGTERM", "SIGUSR1") else 0

    return _on_all_ranks(parse, run)


def dry_run(cfg: config_mod.TrainConfig, comm: Any) -> None:
    """Everything `train` checks, then where every rank would run and what it would do. The
    device and transport come from the rank runtime's own functions; no model is built."""
    from mpipipe import mbthreads
    from mpipipe.job import agree, describe, finalize, prepare, scan_tokens
    from mpipipe.memory import per_rank, table
    from mpipipe.parallel.grid import Grid
    from mpipipe.runtime import make_transport, place
    from mpipipe.schedule.render import summary, timeline

    job = agree(comm, lambda: prepare(cfg, comm.Get_size()))
    grid = Grid.create(comm, job.cfg.pp, job.cfg.rank_order, job.cfg.tp)
    try:
        agree(grid.world, lambda: scan_tokens(job, grid))  # ids outside the vocabulary
        device = agree(grid.world, lambda: place(job, grid))
        job = finalize(job, grid.world, device.xp)
        _, policy = make_transport(job, device)
        layout, placement = grid.layout(), grid.placement(device.name)
    finally:
        grid.free()
    if comm.Get_rank() != 0:
        return
    print(describe(job, layout))
    print(f"transport: {policy}")
    print("rank  host              local  device  stage  replica  tp")
    for rank, host, local, dev, stage, replica, shard in placement:
        print(f"{rank:>4}  {host:<16}  {local:>5}  {dev:<6}  {stage:>5}  {replica:>7}  {shard:>2}")
    print(timeline(job.report))  # the checker's report, with the emulated costs if any
    print(summary(job.report))
    zero_dp = (job.cfg.dp or 1) if job.cfg.zero else 1
    threads = mbthreads.threads_for(job, comm.Get_size(), job.backend, mbthreads.cores())
    if threads:
        print(f"micro-batches on threads: {threads} at once, one per core (--microbatch-threads)")
    print(table(per_rank(job, threads), job.cfg.tp, job.cfg.sequence_parallel, zero_dp))
    print("dry run: configuration, layout and schedule are valid; nothing was trained")


def cmd_eval(argv: list[str]) -> int:
    """python -m mpipipe eval --resume DIR [--batches N]: held-out loss and bits per byte."""
    from mpipipe.inference import evaluate

    p = _Parser(prog="mpipipe eval", description="Held-out loss of a checkpoint.")
    p.add_argument("--resume", required=True, help="checkpoint DIR (its latest) or step dir")
    p.add_argument("--batches", type=int, default=8, help="global batches to average")

    def run(a: argparse.Namespace, comm: Any) -> int:
        evaluate(a.resume, a.batches, comm)
        return 0

    return _on_all_ranks(lambda: p.parse_args(argv), run)


def cmd_generate(argv: list[str]) -> int:
    """python -m mpipipe generate --resume DIR --prompt "def " --tokens 200."""
    from mpipipe.inference import generate

    p = _Parser(prog="mpipipe generate", description="Sample bytes from a GPT checkpoint.")
    p.add_argument("--resume", required=True, help="checkpoint DIR (its latest) or step dir")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace, comm: Any) -> int:
        generate(a.resume, a.prompt, a.tokens, a.temperature, a.top_k, a.seed, comm)
        return 0

    return _on_all_ranks(lambda: p.parse_args(argv), run)


def cmd_ckpt(argv: list[str]) -> int:
    """python -m mpipipe ckpt inspect|verify DIR, ckpt export DIR OUT.h5 (no MPI needed)."""
    from mpipipe import checkpoint

    p = _Parser(prog="mpipipe ckpt", description="Inspect, verify or export a checkpoint.")
    p.add_argument("action", choices=("inspect", "verify", "export"))
    p.add_argument("dir", help="checkpoint DIR (its latest) or a step directory")
    p.add_argument("out", nargs="?", help="export: the HDF5 file to write")
    a = p.parse_args(argv)
    step_dir = checkpoint.resolve(a.dir)
    if a.action == "inspect":
        print(checkpoint.inspect(step_dir))
        return 0 if not checkpoint.verify(step_dir) else 1
    if a.action == "verify":
        problems = checkpoint.verify(step_dir)
        for msg in problems:
            print(f"BAD {msg}")
        print(f"{step_dir}: {'OK' if not problems else f'{len(problems)} bad shard(s)'}")
        return 0 if not problems else 1
    if not a.out:
        raise ConfigError("ckpt export needs an output file: ckpt export DIR OUT.h5")
    n = checkpoint.export(step_dir, Path(a.out))
    print(f"wrote {a.out}: {n} tensors from {step_dir}")
    return 0


def cmd_doctor(argv: list[str]) -> int:
    """python -m mpipipe doctor [--cuda-aware auto|yes|no]: the MPI library and version, the
    CUDA-aware verdict and why, the backend, and the GPUs each rank sees and would use."""
    from mpi4py import MPI

    from mpipipe.parallel.cuda_aware import verdict
    from mpipipe.parallel.grid import Grid
    from mpipipe.xp import cuda_versions, gpu_count, gpu_name, pick_device, resolve_backend

    p = _Parser(prog="mpipipe doctor", description="What this machine and MPI offer mpipipe.")
    p.add_argument("--cuda-aware", default="auto", choices=("auto", "yes", "no"))
    p.add_argument("--backend", default="auto", choices=("auto", "numpy", "cupy"))
    a = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    grid = Grid.create(comm)
    backend, why_backend = resolve_backend(a.backend)
    aware, why = verdict(a.cuda_aware)
    n = gpu_count()
    try:
        index = pick_device(grid.local_rank, grid.local_size, n, False) if n else None
        device = "cpu" if index is None else f"cuda:{index} ({gpu_name(index)})"
    except ValueError as e:
        device = f"none ({e})"
    rows = grid.world.gather(
        (grid.world.Get_rank(), MPI.Get_processor_name(), grid.local_rank, n, device), root=0
    )
    grid.free()
    if rows is not None:  # rank 0
        # Open MPI counts the C string's terminating NUL in the length mpi4py hands back
        version = MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]
        print(
            f"MPI library: {version} (standard {'.'.join(map(str, MPI.Get_version()))}, "
            f"mpi4py thread level {MPI.Query_thread()})"
        )
        print(f"CUDA-aware: {'yes' if aware else 'no'}: {why}")
        nonblocking = MPI.Get_version() >= (3, 0)  # Ireduce_scatter_block, Iallgather
        print(
            f"ZeRO-1 (--zero 1): {'available' if nonblocking else 'needs MPI 3'}: its "
            "buckets are reduce-scattered and all-gathered through the same transport"
        )
        print(f"backend: {backend} ({why_backend}); {cuda_versions()} on rank 0")
        print("rank  host              local  GPUs  device")
        for rank, host, local, gpus, dev in rows:
            print(f"{rank:>4}  {host:<16}  {local:>5}  {gpus:>4}  {dev}")
    return 0


def cmd_data(argv: list[str]) -> int:
    """python -m mpipipe data encode IN... -o OUT.bin | data inspect FILE (no MPI needed)."""
    from mpipipe.data.tools import main as data

    return data(argv)


def cmd_study(argv: list[str]) -> int:
    from mpipipe.study import main as study

    return study(argv)


def cmd_plan(argv: list[str]) -> int:
    from mpipipe.plan.cli import main as plan

    return plan(argv)


COMMANDS = {
    "train": cmd_train,
    "study": cmd_study,
    "plan": cmd_plan,
    "schedule": cmd_schedule,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "ckpt": cmd_ckpt,
    "doctor": cmd_doctor,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            f"usage: python -m mpipipe {{{','.join(COMMANDS)}}} [options]\n{__doc__}",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ScheduleError as e:
        print(f"mpipipe: schedule error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"mpipipe: error: {e}", file=sys.stderr)
        return 2
