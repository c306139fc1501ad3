"""The synthesizer and the V-shape family, as pure data (no MPI): caps, determinism, the table's
claim on a cheap subset, and an exhaustive search over every action order on tiny cases."""

from __future__ import annotations

import itertools
import math

import pytest

from mpipipe import cli
from mpipipe.errors import ConfigError, ScheduleError
from mpipipe.schedule import SCHEDULES, Costs, build, check, simulate
from mpipipe.schedule.actions import Action, Plan, linear_stages
from mpipipe.schedule.listsched import v_stages
from mpipipe.schedule.synth import (
    evaluate,
    memory,
    read_stage_costs,
    stage_costs,
    synthesize,
)

SKEWED = Costs([1.5, 1, 1, 1.5], [3, 2, 2, 3], [1.5, 1, 1, 1.5], latency=0.1)


@pytest.mark.parametrize("cap", [2, 3, 4])
def test_synthesized_fits_the_cap_passes_the_checker_and_is_deterministic(cap):
    first = synthesize(4, 8, cap, SKEWED)
    again = synthesize(4, 8, cap, SKEWED)
    assert first.plan == again.plan
    report = check(first.plan, stage_costs(SKEWED, 4, len(first.plan.stages[0])))
    assert memory(report) <= cap
    assert report.step_time == first.report.step_time
    for row in first.plan.actions:  # W in increasing micro-batch order per chunk: bitwise
        for c in range(len(first.plan.stages[0])):
            ws = [a.mb for a in row if a.kind == "W" and a.chunk == c]
            assert ws == list(range(8))


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("costs", [Costs(1, 2, 1), SKEWED, Costs(1, 2, 2, 0.1)], ids=str)
def test_never_slower_than_a_named_schedule_that_fits(m, costs):
    """A cheap subset of benchmarks/bench_synth.py's table (P = 4)."""
    named = []
    for name in sorted(SCHEDULES):
        try:
            named.append(evaluate(build(name, 4, m), costs))
        except ConfigError:
            continue
    wins = 0
    for cap in (2, 3, 4):
        fit = [r for r in named if memory(r) <= cap]
        got = synthesize(4, m, cap, costs, [r.plan for r in fit]).report
        best = min(r.step_time for r in fit)
        assert got.step_time <= best + 1e-9, (cap, got.step_time, best)
        wins += got.step_time < best - 1e-9
    assert wins >= 1  # it synthesizes, not only picks


def _orders(v: int, m: int) -> list[tuple[Action, ...]]:
    """Every order of one rank's F/B/W on `v` chunks the checker's structure rules allow."""
    out: list[tuple[Action, ...]] = []

    def grow(row: list[Action], nxt: dict[tuple[str, int], int]) -> None:
        if len(row) == 3 * m * v:
            out.append(tuple(row))
            return
        for c in range(v):
            for kind, before in (("F", None), ("B", "F"), ("W", "B")):
                mb = nxt[(kind, c)]
                if mb < m and (before is None or mb < nxt[(before, c)]):
                    nxt[(kind, c)] += 1
                    grow([*row, Action(kind, mb, c)], nxt)
                    nxt[(kind, c)] -= 1

    grow([], {(k, c): 0 for k in "FBW" for c in range(v)})
    return out


def _optimum(pp: int, m: int, cap: float, costs: Costs) -> float:
    best = math.inf
    for stages in (linear_stages(pp), v_stages(pp)):
        v = len(stages[0])
        scaled = stage_costs(costs, pp, v)
        orders = _orders(v, m)
        for rows in itertools.product(orders, repeat=pp):
            try:
                report = simulate(Plan("x", m, stages, rows), scaled)
            except ScheduleError:
                continue
            if memory(report) <= cap:
                best = min(best, report.step_time)
    return best


@pytest.mark.parametrize(
    ("m", "cap", "costs"),
    [
        (2, 1, Costs(1, 2, 1, 0.1)),
        (2, 2, Costs(1, 2, 1, 0.1)),
        (3, 2, Costs([1.5, 1], [3, 2], [1.5, 1])),
        (3, 3, Costs(1, 2, 2)),
        (1, 1, Costs(1, 1, 1)),
    ],
)
def test_heuristic_matches_an_exhaustive_search_on_two_ranks(m, cap, costs):
    """Every action order of both placements (one chunk, and a V for m = 1) on 2 ranks."""
    got = synthesize(2, m, cap, costs).report.step_time
    if m > 1:  # the V's orders are too many to enumerate beyond one micro-batch
        best = _optimum_linear(2, m, cap, costs)
        assert got <= best + 1e-9
    else:
        assert got == pytest.approx(_optimum(2, m, cap, costs), abs=1e-9)


def _optimum_linear(pp: int, m: int, cap: float, costs: Costs) -> float:
    orders = _orders(1, m)
    best = math.inf
    for rows in itertools.product(orders, repeat=pp):
        try:
            report = simulate(Plan("x", m, linear_stages(pp), rows), costs)
        except ScheduleError:
            continue
        if memory(report) <= cap:
            best = min(best, report.step_time)
    return best


def test_v_half_and_v_min_hold_a_half_and_a_third_of_1f1b():
    for pp, m in ((4, 8), (8, 16), (8, 32)):
        one = memory(check(build("1f1b", pp, m)))
        assert memory(check(build("v-half", pp, m))) == one / 2
        assert memory(check(build("v-min", pp, m))) <= math.ceil(2 * one / 3) / 2


def test_dualpipev_is_a_v_with_near_zero_bubble():
    plan = build("dualpipev", 4, 16)
    assert plan.stages == ((0, 7), (1, 6), (2, 5), (3, 4))
    assert check(plan).bubble < 0.05


def test_errors_name_the_fix(capsys):
    with pytest.raises(ConfigError, match=r"--memory 0.5 is below one micro-batch.*--memory 1"):
        synthesize(4, 8, 0.5, Costs())
    with pytest.raises(ConfigError, match="give 3 values for --pp 4 .one per pipeline rank"):
        synthesize(4, 8, 2, Costs([1, 1, 1]))
    with pytest.raises(ConfigError, match=r"dualpipev needs --microbatches at least 2 x --pp"):
        build("dualpipev", 4, 6)
    with pytest.raises(ValueError, match="no lines"):
        read_stage_costs("# nothing\n")
    assert cli.main(["schedule", "--synthesize", "--pp", "4"]) == 2
    assert "--synthesize needs --memory K" in capsys.readouterr().err


def test_schedule_tool_prints_every_schedule_side_by_side(tmp_path, capsys):
    f = tmp_path / "costs.txt"
    f.write_text("F=1.5,B=3,W=1.5  # the embedding\nF=1,B=2,W=1\nF=1,B=2,W=1\nF=1.5,B=3,W=1.5\n")
    args = ["schedule", "--synthesize", "--pp", "4", "--microbatches", "8", "--memory", "3"]
    assert cli.main([*args, "--stage-costs", str(f), "--costs", "latency=0.1"]) == 0
    out = capsys.readouterr().out
    for name in [*SCHEDULES, "synth"]:
        assert f"| {name:<11} |" in out
    assert "| v-half      |     77.75 |  0.486 |                           2 | yes" in out
    assert "peak stashed activations per rank: [6, 6, 6, 6]" in out  # the synthesized V


def test_train_auto_needs_memory_and_picks_its_chunks():
    from mpipipe import TrainConfig

    with pytest.raises(ConfigError, match="--schedule auto and --memory K go together"):
        TrainConfig(schedule="auto").validate()
    with pytest.raises(ConfigError, match="--schedule auto and --memory K go together"):
        TrainConfig(memory=2).validate()
    with pytest.raises(ConfigError, match="leave --virtual-stages out"):
        TrainConfig(schedule="auto", memory=2, virtual_stages=2).validate()
    TrainConfig(schedule="auto", memory=2).validate()


class _OneRank:
    """What finalize asks of a communicator, for one process."""

    def Get_rank(self):  # noqa: N802 - MPI's name
        return 0

    def bcast(self, value, root=0):
        return value


def test_train_auto_synthesizes_for_each_layers_measured_costs():
    """Real compute: rank 0 times every layer's F, B, W (the head of a 32768-word vocabulary on
    d_model 64 outweighs a block many times), and the schedule is synthesized for the layers
    each virtual stage holds; the unit-cost plan it replaces is slower under those costs."""
    from mpipipe import TrainConfig
    from mpipipe.job import finalize, prepare, synth_costs

    cfg = TrainConfig(
        layers=8, d_model=64, heads=2, seq_len=16, vocab=32768, global_batch=8, microbatches=8,
        pp=4, schedule="auto", memory=2,
    )  # fmt: skip
    job = prepare(cfg, 4)
    assert job.auto_costs.endswith("(not yet measured)") and job.measured is None
    unit_plan = job.plan
    job = finalize(job, _OneRank())
    assert job.auto_costs == "each layer's measured F, B, W" and job.layer_clock
    assert job.layer_actions is not None and len(job.layer_actions) == len(job.model.layers)
    scale, _ = synth_costs(job.cfg, job.model, None, None, job.layer_actions)
    measured = scale(4, len(job.plan.stages[0]))
    assert job.measured == measured
    assert measured.of("F", job.plan.n_stages - 1) > 2 * measured.of("F", 1)  # head and loss
    assert job.report.step_time == check(job.plan, measured).step_time
    assert memory(job.report) <= 2
    unit = check(unit_plan, scale(4, len(unit_plan.stages[0])))
    assert job.report.step_time < unit.step_time, (job.plan.name, unit_plan.name)


def test_train_auto_with_emulated_compute_synthesizes_for_the_emulated_costs():
    from mpipipe import TrainConfig
    from mpipipe.job import describe, finalize, prepare

    cfg = TrainConfig(layers=8, pp=4, microbatches=8, global_batch=8, schedule="auto",
                      memory=2, emulate="F=1,B=2,W=1")  # fmt: skip
    job = finalize(prepare(cfg, 4), _OneRank())  # nothing to time: emulated costs are known
    assert job.auto_costs == "the emulated costs" and job.measured is None
    assert "schedule auto: synthesized under --memory 2 for the emulated costs" in describe(
        job, []
    )


def test_schedule_tool_profiles_trains_model(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nlayers = 8\nd-model = 32\nheads = 2\nseq-len = 16\nglobal-batch = 8")
    args = ["schedule", "--synthesize", "--pp", "4", "--microbatches", "8", "--memory", "2"]
    assert cli.main([*args, "--profile", "--config", str(cfg), "--costs", "latency=0.01"]) == 0
    out = capsys.readouterr().out
    assert "costs in ms timed here by perf_counter for gpt 8x32, micro-batch 1 (per rank" in out
    for name in [*SCHEDULES, "synth"]:  # 8 layers: the V-shaped schedules too
        assert f"| {name:<11} |" in out
    assert cli.main([*args, "--profile", "--stage-costs", str(cfg)]) == 2
    assert "--stage-costs and --profile both give the costs" in capsys.readouterr().err
