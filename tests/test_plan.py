"""The planner's cost and memory model: it agrees with the dry run's memory table and the
checker's simulation, its FLOPs are train's, and the search returns fitting layouts; the
calibration's 2-rank bench and the quick validation run under mpiexec."""

from __future__ import annotations

import dataclasses

import pytest

from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError
from mpipipe.job import prepare
from mpipipe.memory import activation_elements, per_rank
from mpipipe.plan.cost import GPT, Layout, action_costs, memory
from mpipipe.plan.machine import Link, Machine, from_mapping, largest, load
from mpipipe.plan.predict import plan_of, predict
from mpipipe.plan.search import Space, search
from tests import mpirun

SMALL = dict(layers=6, d_model=32, heads=4, seq_len=16, vocab=64, global_batch=16)


class FixedProfile:
    """A profile (plan/profiled.py) with fixed F/B/W seconds per layer and an optimizer at
    1 ns per parameter, whatever the micro-batch and tp share."""

    def times(self, b: int, tp: int) -> dict[str, tuple[float, float, float]]:
        return {"embed": (1e-3, 0.0, 2e-3), "block": (8e-3, 18e-3, 30e-3),
                "head": (2e-3, 4e-3, 5e-3)}  # fmt: skip

    def optimizer_rate(self, optimizer: str, tp: int) -> float:
        return 1e-9


def ideal(**kw: object) -> Machine:
    """Free communication, no overhead: only compute costs time."""
    base = Machine("ideal", 8, 64.0, 1e6, {"float32": 1.0}, 1.0, Link(1e9, 0), Link(1e9, 0))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pp", "tp", "schedule", "v"), [(2, 1, "1f1b", 1), (3, 2, "interleaved", 2), (2, 4, "zbv", 2)]
)
def test_memory_matches_the_dry_run_table(pp: int, tp: int, schedule: str, v: int) -> None:
    """Parameters and stash per pipeline rank equal memory.per_rank's for the job train runs."""
    m = 3 if schedule == "interleaved" else 4
    cfg = TrainConfig(**SMALL, pp=pp, tp=tp, schedule=schedule, microbatches=m)
    cfg = cfg.replace(virtual_stages=v if v > 1 else None, global_batch=4 * m)
    job = prepare(cfg, pp * tp)
    model = GPT(**{**SMALL, "global_batch": job.cfg.global_batch})
    layout = Layout(pp, 1, tp, schedule, v, job.cfg.microbatches)
    _, peaks = plan_of(schedule, pp, job.cfg.microbatches, v)
    for r, want in enumerate(per_rank(job)):
        got = memory(model, layout, job.plan.stages[r], peaks[r])
        assert (got.params, got.weights, got.stash) == (
            want.params,
            want.weights_bytes,
            want.stash_bytes,
        )


def test_emulated_prediction_is_the_checkers_simulation() -> None:
    """With emulated compute and free links, the predicted step is the job's dry run (dp = 1)."""
    cfg = TrainConfig(**SMALL, pp=3, schedule="zb-h1", microbatches=4, emulate="F=1,B=2,W=0.5")
    job = prepare(cfg, 3)
    model = GPT(**SMALL, emulate=(1.0, 2.0, 0.5))
    p = predict(model, Layout(3, 1, 1, "zb-h1", 1, 4), ideal())
    assert p.step_time == pytest.approx(job.report.step_time, rel=1e-3)  # + the optimizer
    assert p.bubble == pytest.approx(job.report.bubble, rel=1e-9)


def test_compute_time_counts_train_flops() -> None:
    """At 1 FLOP/s and infinite bandwidth, F + B + W over all stages is the model's training
    FLOPs (6 per parameter and token + attention) minus the embedding's (a lookup) and the
    biases' and LayerNorms' (elementwise, priced by bandwidth)."""
    model = GPT(**SMALL)
    free = ideal(memory_bandwidth_gbs=1e30, flops={"float32": 1e-12})
    for layout in (Layout(2, 1, 1, "1f1b", 1, 4), Layout(1, 2, 2, "1f1b", 1, 2)):
        c = action_costs(model, layout, free)
        total = sum(c.f) + sum(c.b) + sum(c.w)
        samples = model.global_batch // layout.dp
        embed = 6 * model.layer_params("embed") * samples * model.seq_len
        small = 6 * (13 * model.layers + 2) * model.d_model * samples * model.seq_len
        flops = (model.model_flops(samples) - embed - small) / layout.tp
        assert total * layout.microbatches == pytest.approx(flops, rel=1e-9)


def test_zero_sequence_parallel_and_recompute_shrink_what_they_should() -> None:
    model = GPT(**SMALL, dtype="bf16")
    base = Layout(2, 4, 2, "1f1b", 1, 2)
    plain = memory(model, base, (0,), 2)
    zero = memory(model, base.with_(zero=1), (0,), 2)
    sp = memory(model, base.with_(sp=True), (0,), 2)
    full = memory(model, base.with_(recompute="full"), (0,), 2)
    per_param = 2 + 2 + 4 * 3  # bf16 weights and grads, fp32 master and two Adam slots
    assert plain.weights == plain.params * (per_param + 4)  # + fp32 gradients
    assert zero.weights == plain.params * (2 + 2 + 4 + 12 / 4)
    assert sp.stash < plain.stash and full.stash < plain.stash
    assert sp.weights == plain.weights


def test_machine_files_round_trip_and_presets_load() -> None:
    import tomllib

    for name in ("dgx-h100", "selene-a100"):
        m = load(name)
        assert from_mapping(tomllib.loads(m.to_toml()), name) == m
    assert load("selene-a100").peak("bf16") == 312e12


def test_search_returns_fitting_layouts_fastest_first() -> None:
    model = GPT(layers=8, d_model=64, heads=4, seq_len=32, vocab=256, global_batch=32)
    preds, n = search(model, 8, ideal(memory_gib=0.01), Space())
    assert n > len(preds) > 3
    assert all(p.peak_memory <= 0.01 * 2**30 for p in preds)
    assert [p.step_time for p in preds] == sorted(p.step_time for p in preds)
    pinned, _ = search(model, 8, ideal(), Space(pp=2, schedules=("gpipe",)))
    assert {(p.layout.pp, p.layout.schedule) for p in pinned} == {(2, "gpipe")}


def test_validate_quick_runs_two_layouts_and_reports_the_errors(tmp_path) -> None:
    """`plan --validate --quick`: two emulated 2-rank runs, each against its prediction; the
    summary's errors are the table's (and a units slip, 1000x, would not pass the bound)."""

    machine = tmp_path / "m.toml"
    base = load("selene-a100")  # free compute: the emulated sleeps are the work
    machine.write_text(dataclasses.replace(base, name="test").to_toml())
    r = mpirun.run(["-m", "mpipipe", "plan", "--validate", "--quick", "--machine", str(machine)],
                   timeout=240)  # fmt: skip
    assert r.returncode == 0, r.output
    rows = [x for x in r.stdout.splitlines() if x.startswith("| emulated-2 |")]
    assert len(rows) == 2
    errors = [float(x.split("|")[6].strip().rstrip("%")) / 100 for x in rows]
    assert all(abs(e) < 0.5 for e in errors), r.stdout  # sleeps dominate: loose, load-proof
    assert f"max {max(abs(e) for e in errors):.1%}" in r.stdout
    assert "emulated-2: predicted best" in r.stdout


@pytest.mark.parametrize("name", ["block0", "head"])
def test_saved_activations_are_what_the_estimate_counts(name: str) -> None:
    """memory.activation_elements (the dry run's and the planner's stash) against the bytes the
    executor counts in a real layer's saved context (a float32 forward on NumPy)."""
    import numpy as np

    from mpipipe.executor import _nbytes
    from mpipipe.layers import Init

    job = prepare(TrainConfig(layers=2, d_model=32, heads=4, seq_len=16, vocab=64), 1)
    i = {"block0": 1, "head": 3}[name]
    b, model = 3, job.model
    layer = model.layers[i].build(Init.for_layer(0, i, np.float32, np))
    x = np.random.default_rng(0).normal(size=model.act_shape(i - 1, b)).astype(np.float32)
    _, ctx = layer.forward(x)
    assert _nbytes(ctx) == 4 * activation_elements(name, model.meta, b)


def test_plan_prints_a_command_and_toml_that_train_accepts(tmp_path, capsys) -> None:
    """The best layout's train flags and [train] TOML parse and validate as train's own, for the
    ranks planned; the CSV and JSON hold the same layouts, fastest first."""
    import csv
    import json

    import tomllib

    from mpipipe.flags import parse_train
    from mpipipe.plan.cli import main

    model = "--layers 8 --d-model 64 --heads 4 --seq-len 32 --vocab 256 --global-batch 32"
    argv = [*model.split(), "--ranks", "4", "--machine", "selene-a100", "--tp", "1", "--dp", "1"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--explain"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("mpiexec -n 4"))
    flags = line.split(" train ", 1)[1].split()
    job = prepare(parse_train(flags)[0], 4)
    toml = tomllib.loads(out.split("or as a --config file:\n", 1)[1])["train"]
    assert (job.cfg.pp, job.cfg.dp, job.cfg.schedule) == (4, 1, toml["schedule"])
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [float(r["step_time_s"]) for r in rows] == [
        x["step_time_s"] for x in json.loads((tmp_path / "p.json").read_text())
    ]
    assert rows[0]["schedule"] == toml["schedule"] and int(rows[0]["pp"]) == 4
    assert "  time: pipeline" in out  # --explain
    # --profile: the layers timed here (milliseconds on a CPU) replace the A100's roofline
    (tmp_path / "p.csv").unlink()
    assert (
        main(
            [*argv, "--profile", "--pp", "4", "--microbatches", "4", "--out", str(tmp_path / "p")]
        )
        == 0
    )
    timed = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert min(float(r["step_time_s"]) for r in timed) > 10 * float(rows[0]["step_time_s"])


def test_the_gradient_reduction_hides_behind_backward_only_with_overlap() -> None:
    """Without overlap one bucket's all-reduce follows the last action; with overlap the
    buckets of the last layers start during the remaining backward work."""
    from mpipipe.plan.cost import allreduce_time

    slow = Link(0.01, 5.0)  # 10 MB/s: the reduction is long against the emulated compute
    machine = ideal(intra=slow, inter=slow)
    model = GPT(**SMALL, emulate=(1.0, 1.0, 1.0))
    layout = Layout(1, 2, 1, "1f1b", 1, 2, overlap=False)
    off = predict(model, layout, machine, bucket_mb=1e3)
    reduce = allreduce_time(slow, off.memory[0].params * 4, 2)
    assert off.step_time == pytest.approx(
        off.breakdown["pipeline"] + reduce + off.breakdown["optimizer"], rel=1e-9
    )
    on = predict(model, layout.with_(overlap=True), machine, bucket_mb=0.001)
    assert off.breakdown["pipeline"] < on.step_time < off.step_time


def test_action_overhead_by_ranks_interpolates_in_log_ranks_and_round_trips() -> None:
    import tomllib

    m = ideal(action_overhead_us=100.0, action_overhead_by_ranks=((1, 100.0), (4, 700.0)))
    assert m.action_overhead(1) == pytest.approx(100e-6)
    assert m.action_overhead(2) == pytest.approx(400e-6)  # halfway in log2: 1 -> 2 -> 4
    assert m.action_overhead(64) == pytest.approx(700e-6)  # held past the last point
    assert ideal(action_overhead_us=50.0).action_overhead(32) == pytest.approx(50e-6)
    assert from_mapping(tomllib.loads(m.to_toml()), "t") == m
    bad = tomllib.loads(m.to_toml().replace("[[1, 100]", "[[0, 100]"))
    with pytest.raises(ConfigError, match="action_overhead_by_ranks"):
        from_mapping(bad, "t")
    # the N-rank action time reaches every action of an emulated 4-rank layout
    model = GPT(**SMALL, emulate=(1.0, 1.0, 1.0))
    lay = Layout(4, 1, 1, "1f1b", 1, 4)
    one, four = action_costs(model, lay, ideal()), action_costs(model, lay, m)
    extra = [b - a for a, b in zip(one.f + one.b, four.f + four.b, strict=True)]
    assert extra == pytest.approx([700e-6] * 8)  # the table's 4-rank time, not the 1-rank one


def test_action_overhead_by_busy_ranks_interpolates_and_reaches_the_busier_layout() -> None:
    """Where ranks share cores the time per action grows with how many are busy at once: the
    table is linear in busy ranks within a rank count, held past its rows, interpolated in log N
    across rank counts; predict prices a layout at its own busy ranks (ranks x utilisation
    without the overhead), so an all-busy pp = 1 x dp = 4 layout pays more per action than a
    pp = 4 pipeline with the same machine file."""
    import tomllib

    table = ((16, 12.0, 1000.0), (4, 4.0, 400.0), (1, 1.0, 50.0), (16, 4.0, 200.0),
             (4, 2.0, 100.0))  # fmt: skip
    m = ideal(action_overhead_by_busy=table)  # rows in any order
    assert m.action_overhead(4, 3.0) == pytest.approx(250e-6)  # halfway between 4's rows
    assert m.action_overhead(4, 1.0) == pytest.approx(100e-6)  # held below the fewest busy
    assert m.action_overhead(4, None) == pytest.approx(100e-6)  # None: the fewest busy
    assert m.action_overhead(4, 9.0) == pytest.approx(400e-6)  # held past the most busy
    assert m.action_overhead(8, 8.0) == pytest.approx((400e-6 + 600e-6) / 2)  # halfway in log2
    assert m.action_overhead(64, 12.0) == pytest.approx(1000e-6)
    loaded = from_mapping(tomllib.loads(m.to_toml()), "t")
    assert loaded == dataclasses.replace(m, action_overhead_by_busy=tuple(sorted(table)))
    bad_rows = (
        "[[4, 5, 100.0]]",
        "[[4, 0, 100.0]]",
        "[[4, 2, 1.0], [4, 2, 2.0]]",
        "[[4, 2]]",
        "5",
    )
    for bad in bad_rows:
        raw = tomllib.loads(ideal().to_toml() + f"action_overhead_by_busy = {bad}\n")
        with pytest.raises(ConfigError, match="action_overhead_by_busy") as e:
            from_mapping(raw, "t")
        assert "not a number" not in str(e.value)
    from mpipipe.plan.predict import busy_ranks

    model = GPT(**{**SMALL, "layers": 4}, emulate=(1.0, 2.0, 1.0))  # B twice F and W
    pipe, wide = Layout(4, 1, 1, "1f1b", 1, 4), Layout(1, 4, 1, "1f1b", 1, 4)
    assert busy_ranks(model, wide, m) == pytest.approx(4.0)  # no bubble
    # 1F1B with W after each B: busy m (F + B + W) = 16 of 16 + (p - 1)(F + B) = 25 units (the
    # overhead, the same on every action, would change that ratio: it is left out)
    assert busy_ranks(model, pipe, m) == pytest.approx(4 * 16 / 25)
    for lay, busy in ((pipe, 4 * 16 / 25), (wide, 4.0)):
        free, paid = action_costs(model, lay, ideal()), predict(model, lay, m)
        per_action = (
            paid.breakdown["F/B/W stage 0"] - sum(x[0] for x in (free.f, free.b, free.w))
        ) / 3
        assert per_action == pytest.approx(m.action_overhead(4, busy))


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("kind", ["pipeline", "wide", "busy"])
def test_calibration_runs_are_the_layouts_the_planner_fits(kind: str, n: int) -> None:
    """Each calibration run's train flags make the job its (model, layout) describes: the fit
    inverts the planner on the run it launched, and no run is a --validate layout."""
    from mpipipe.flags import parse_train
    from mpipipe.plan import calibrate, validate
    from mpipipe.plan.cli import model_of

    run = {"pipeline": calibrate.pipeline_run, "wide": calibrate.wide_run}.get(kind)
    model, lay, flags = run(n) if run else calibrate.busy_run(n, 4)
    job = prepare(parse_train(flags)[0], n)
    c = job.cfg
    assert (c.pp, c.dp, c.tp, c.schedule, c.microbatches) == (
        lay.pp, lay.dp, lay.tp, lay.schedule, lay.microbatches
    )  # fmt: skip
    assert model_of(c) == model

    def key(n: int, c: TrainConfig) -> tuple[object, ...]:
        return (n, c.pp, c.dp, c.tp, c.schedule, c.microbatches, c.layers, c.d_model, c.emulate)

    validated = {key(k, prepare(parse_train(t.split())[0], k).cfg) for _, k, t in validate.FULL}
    assert key(n, c) not in validated


def test_calibration_writes_both_kinds_of_rows_at_their_busy_ranks(monkeypatch) -> None:
    """overheads_by_ranks on runs whose times a known machine predicts (`_medians` stubbed):
    for each N it writes the pp = N run's and, from N = 4, the wide run's time per action,
    each at that run's own busy ranks."""
    from mpipipe.plan import calibrate
    from mpipipe.plan.predict import busy_ranks

    runs, truth = {}, []
    for n in calibrate.BY_RANKS:
        kinds = [("pipe", calibrate.pipeline_run)] + [("wide", calibrate.wide_run)] * (n >= 4)
        for kind, run in kinds:
            model, lay, flags = run(n)
            us = 100.0 * n + (1000.0 if kind == "wide" else 0.0)  # distinct per run
            truth.append((n, busy_ranks(model, lay, ideal()), us))
            runs[tuple(flags)] = (model, lay, ideal(action_overhead_us=us))
        for m in calibrate.BUSY_M:  # the gradient phase's runs: any times
            runs[tuple(calibrate.busy_run(n, m)[2])] = None

    def medians(launcher: list[str], flags: list[str]) -> dict[str, float]:
        if runs[tuple(flags)] is None:
            return {"step_time_s": 1.0, "pipeline_time_s": 0.5, "allreduce_exposed_s": 0.0}
        model, lay, at = runs[tuple(flags)]
        p = predict(model, lay, at)
        return {"step_time_s": p.step_time, "pipeline_time_s": p.breakdown["pipeline"],
                "allreduce_exposed_s": 0.0}  # fmt: skip

    monkeypatch.setattr(calibrate, "_medians", medians)
    got = calibrate.overheads_by_ranks(lambda n: [], ideal()).action_overhead_by_busy
    assert got[0] == (1, 1.0, 0.0)  # the 1-rank runtime figure
    assert len(got) == 1 + len(truth)
    for (n, b, us), (tn, tb, tus) in zip(got[1:], sorted(truth), strict=True):
        assert n == tn and b == pytest.approx(tb) and us == pytest.approx(tus, rel=1e-6)


def test_screen_prices_the_busy_ranks_as_predict_does() -> None:
    """search.screen, which picks the layouts that get an exact prediction, prices an all-busy
    pp = 1 x dp = 4 layout at 4 busy ranks (not each N's fewest), and computing replicas' wait."""
    from mpipipe.plan.search import screen

    emulated = GPT(**{**SMALL, "layers": 4}, emulate=(1.0, 1.0, 1.0))
    wide = Layout(1, 4, 1, "1f1b", 1, 4)
    by_busy = ideal(action_overhead_by_busy=((4, 1.0, 0.0), (4, 4.0, 1000.0)))
    extra = screen(emulated, wide, by_busy)[0] - screen(emulated, wide, ideal())[0]
    assert extra == pytest.approx(3 * 4 * 1000e-6)  # F, B, W of 4 micro-batches at 1 ms each
    real = dataclasses.replace(GPT(**SMALL), profile=FixedProfile())
    waiting = ideal(busy_collective_us=100.0)
    assert screen(real, wide, waiting)[0] - screen(real, wide, ideal())[0] == pytest.approx(1e-4)


def test_calibrated_overhead_reproduces_the_measured_step() -> None:
    """calibrate.overhead_for inverts the planner: the overhead it finds for a pipeline time
    that a known overhead produced is that overhead (the step's other terms left out)."""
    from mpipipe.plan.calibrate import overhead_for, pipeline_run

    model, lay, _ = pipeline_run(4)
    noisy = ideal(action_overhead_us=1234.0, step_overhead_ms=50.0)
    pipeline = predict(model, lay, noisy).breakdown["pipeline"]
    assert overhead_for(pipeline, model, lay, ideal(step_overhead_ms=50.0)) == pytest.approx(
        1234.0, rel=1e-4
    )


def test_step_and_gradient_phase_tables_price_by_ranks_and_only_dp_pays_the_phase() -> None:
    """step_overhead_by_ranks replaces the 1-rank step overhead for N ranks; the gradient
    phase's calibrated rounds (log2 of the group) and drift (sqrt of a rank's actions, the
    expected slowest of dp replicas) reach layouts with dp > 1 only, after their last action."""
    import tomllib

    from mpipipe.plan.machine import largest

    assert largest(1) == pytest.approx(0.0, abs=1e-9)
    assert largest(2) == pytest.approx(1 / 3.141592653589793**0.5, rel=1e-6)  # 1 / sqrt(pi)
    assert largest(4) == pytest.approx(1.0294, abs=1e-4)  # the tabulated normal order statistic
    m = ideal(step_overhead_ms=1.0, step_overhead_by_ranks=((1, 1.0), (16, 9.0)),
              reduce_overhead_by_ranks=((2, 4.0), (8, 10.0)))  # fmt: skip
    assert m.step_overhead(4) == pytest.approx(5e-3)  # halfway in log: 1 -> 4 -> 16
    assert m.reduce_overhead(4, 4, 9) == pytest.approx(7e-3)  # N replicas: the table's value
    assert m.reduce_overhead(4, 2, 9) == pytest.approx(3.5e-3)  # 2 of 4: log2(2) / log2(4)
    assert m.reduce_overhead(64, 8, 9) == pytest.approx(5e-3)  # held past the last point, 3/6
    assert m.reduce_overhead(4, 1, 9) == 0.0
    assert ideal().reduce_overhead(32, 32, 9) == 0.0  # presets: the links' model only
    d = ideal(reduce_drift_by_ranks=((4, 2.0),))
    assert d.reduce_overhead(4, 4, 9) == pytest.approx(6e-3)  # 2 ms x sqrt(9)
    assert d.reduce_overhead(4, 2, 16) == pytest.approx(8e-3 * largest(2) / largest(4))
    assert from_mapping(tomllib.loads(m.to_toml()), "t") == m
    assert from_mapping(tomllib.loads(d.to_toml()), "t") == d
    bad = tomllib.loads(m.to_toml().replace("[[2, 4]", "[[2, -4]"))
    with pytest.raises(ConfigError, match="reduce_overhead_by_ranks"):
        from_mapping(bad, "t")
    model = GPT(**SMALL, emulate=(1.0, 1.0, 1.0))
    for layout, phase in (
        (Layout(4, 1, 1, "1f1b", 1, 4), 0.0),
        (Layout(2, 2, 1, "1f1b", 1, 4), 3.5e-3),
    ):
        base = predict(model, layout, ideal()).step_time
        got = predict(model, layout, m)
        assert got.step_time - base == pytest.approx(5e-3 + phase, rel=1e-9)
        assert got.breakdown["dp reduce (not hidden)"] == pytest.approx(phase, abs=1e-12)


def test_phase_fit_splits_rounds_from_drift() -> None:
    """calibrate.phase_fit inverts extra = rounds + drift sqrt(k) from two action counts, and
    never returns a negative part."""
    from mpipipe.plan.calibrate import phase_fit

    assert phase_fit([(12, 3.0 + 2.0 * 12**0.5), (48, 3.0 + 2.0 * 48**0.5)]) == pytest.approx(
        (3.0, 2.0)
    )
    assert phase_fit([(12, 5.0), (48, 4.0)]) == pytest.approx((5.0, 0.0))  # noise: no drift
    rounds, drift = phase_fit([(12, 0.0), (48, 7.0)])  # steep: all drift, through the larger
    assert (rounds, drift) == pytest.approx((0.0, 7.0 / 48**0.5))


def test_busy_collectives_price_tensor_parallel_ranks_only() -> None:
    """A calibrated machine's busy_collective_us reaches every tensor-parallel collective (2 per
    block in F and in B, the embedding's, the loss's two, the head's input gradient), with a
    wait of busy_jitter_us x sqrt(compute since the last collective, in ms); full
    recomputation pays F's again in B; tp = 1 and emulated layouts pay neither, and the
    machine file keeps both (NaN refused)."""
    import tomllib

    model = dataclasses.replace(GPT(**SMALL), profile=FixedProfile())  # 6 blocks, 2 stages of 3
    busy = ideal(busy_collective_us=100.0, busy_jitter_us=10.0)
    lay = Layout(2, 1, 2, "1f1b", 1, 4)
    plain, priced = action_costs(model, lay, ideal()), action_costs(model, lay, busy)
    us = 1e-6
    # a block's F: 2 x (100 + 10 sqrt(4 ms)); its B: 2 x (100 + 10 sqrt(9 ms)); W: nothing
    block_f, block_b = 2 * (100 + 10 * 2) * us, 2 * (100 + 10 * 3) * us
    embed_f = (100 + 10 * 1) * us  # one all-reduce after 1 ms
    head_f = (2 * 100 + 10 * 2**0.5) * us  # the loss's max after 2 ms, its sum at once
    head_b = (100 + 10 * 2) * us  # the input gradient after 4 ms
    assert [t - p for p, t in zip(plain.f, priced.f, strict=True)] == pytest.approx(
        [3 * block_f + embed_f, 3 * block_f + head_f]
    )
    assert [t - p for p, t in zip(plain.b, priced.b, strict=True)] == pytest.approx(
        [3 * block_b, 3 * block_b + head_b]
    )
    assert priced.w == plain.w
    full = Layout(2, 1, 2, "1f1b", 1, 4, "full")
    plain, priced = action_costs(model, full, ideal()), action_costs(model, full, busy)
    assert priced.b[0] - plain.b[0] == pytest.approx(3 * (block_b + block_f))
    four = Layout(2, 1, 4, "1f1b", 1, 4)  # the slowest of 4 waits longer than of 2
    plain, priced = action_costs(model, four, ideal()), action_costs(model, four, busy)
    slowest = largest(4) / largest(2)
    assert priced.b[0] - plain.b[0] == pytest.approx(3 * 2 * (100 + 10 * 3 * slowest) * us)
    one = Layout(2, 1, 1, "1f1b", 1, 4)
    assert action_costs(model, one, busy) == action_costs(model, one, ideal())
    emulated = GPT(**SMALL, emulate=(1.0, 1.0, 1.0))
    assert action_costs(emulated, lay, busy) == action_costs(emulated, lay, ideal())
    assert from_mapping(tomllib.loads(busy.to_toml()), "t") == busy
    for value in ("-1", "nan"):
        bad = tomllib.loads(
            busy.to_toml().replace("busy_jitter_us = 10", f"busy_jitter_us = {value}")
        )
        with pytest.raises(ConfigError, match="busy_jitter_us"):
            from_mapping(bad, "t")


def test_computing_replicas_gradient_phase_waits_for_the_slowest() -> None:
    """dp > 1 with real compute: the gradient reduction ends later by the busy wait, for the
    compute since the step's start (the pipeline's end) and the slowest of dp replicas, in
    place of the drift table (measured on sleeping replicas), which emulated replicas keep;
    the all-reduce's rounds apply to both; dp = 1 pays nothing."""
    model = dataclasses.replace(GPT(**SMALL), profile=FixedProfile())
    rounds = ((2, 3.0), (8, 3.0))  # ms for dp = N replicas: dp pays log2(dp) / log2(N)
    tables = ideal(reduce_overhead_by_ranks=rounds, reduce_drift_by_ranks=((2, 5.0), (8, 5.0)))
    busy = dataclasses.replace(tables, busy_collective_us=100.0, busy_jitter_us=10.0)
    for pp, dp, tp in ((1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2)):
        lay = Layout(pp, dp, tp, "1f1b", 1, 4)
        plain = predict(model, lay, ideal(reduce_overhead_by_ranks=rounds))
        priced = predict(model, lay, busy)
        compute = priced.breakdown["pipeline"]  # the last rank's, whose reduction ends last
        wait = (100 + 10 * (compute / 1e-3) ** 0.5 * largest(dp) / largest(2)) * 1e-6
        assert priced.step_time - compute - wait == pytest.approx(
            plain.step_time - plain.breakdown["pipeline"]
        )
        if tp == 1:  # no collective in the pipeline: only the gradient phase moved
            assert compute == plain.breakdown["pipeline"]
    one = Layout(1, 1, 1, "1f1b", 1, 4)
    assert predict(model, one, busy).step_time == predict(model, one, ideal()).step_time
    emulated, two = GPT(**SMALL, emulate=(1.0, 1.0, 1.0)), Layout(1, 2, 1, "1f1b", 1, 4)
    drift = 5.0 * (3 * 4) ** 0.5 * 1e-3  # 12 actions; dp = N = 2: the table's own figure
    assert predict(emulated, two, busy).step_time == pytest.approx(
        predict(emulated, two, ideal(reduce_overhead_by_ranks=rounds)).step_time + drift
    )


def test_sequence_parallel_prices_four_collectives_in_each_of_f_b_and_w() -> None:
    """With sequence parallelism a block's F, B and W each run 4 collectives (2 all-gathers
    and 2 reduce-scatters; W gathers again): W pays the 2 all-reduces' bytes and every one of
    the 12 pays the busy terms (roofline compute: no profile of sp)."""
    model = GPT(**SMALL)
    sp = Layout(2, 1, 2, "1f1b", 1, 4).with_(sp=True)
    link = ideal(intra=Link(1.0, 5.0), inter=Link(1.0, 5.0))  # 1 GB/s, 5 us
    free, paid = action_costs(model, sp, ideal()), action_costs(model, sp, link)
    act = 16 // 4 * SMALL["seq_len"] * SMALL["d_model"] * 4  # b T C float32
    ring = 2 * 5e-6 + act / 1e9  # 2 ranks: 2 (n - 1) alpha + 2 (n - 1) / n bytes / beta
    # stage 0 W: 3 blocks x 2 all-reduces' bytes, and the embedding gathers its gradient
    assert paid.w[0] - free.w[0] == pytest.approx(3 * 2 * ring + ring / 2)
    busy = dataclasses.replace(link, busy_collective_us=100.0)
    priced = action_costs(model, sp, busy)
    assert priced.w[0] - paid.w[0] == pytest.approx((3 * 4 + 1) * 100e-6)
    assert priced.f[0] - paid.f[0] == pytest.approx((3 * 4 + 1) * 100e-6)


def test_busy_fit_recovers_the_fixed_time_and_the_jitter() -> None:
    """calibrate.busy_fit: lost = fixed + jitter sqrt(compute / 1 ms) by least squares; a
    curve that would start below 0 goes through the origin; neither part is negative."""
    from mpipipe.plan.calibrate import busy_fit

    segments = (0.25e-3, 0.5e-3, 1e-3, 2e-3, 4e-3, 16e-3)
    exact = [(s, 40e-6 + 150e-6 * (s / 1e-3) ** 0.5) for s in segments]
    assert busy_fit(exact) == pytest.approx((40e-6, 150.0))
    fixed, jitter = busy_fit([(s, 100e-6 * (s / 1e-3) ** 0.5 - 20e-6) for s in segments])
    assert fixed == 0.0 and 0 < jitter < 100.0
    falling = [(s, 60e-6 - 1e-3 * s) for s in segments]  # noise: no jitter, their mean
    assert busy_fit(falling) == pytest.approx((sum(y for _, y in falling) / 6, 0.0))


def test_busy_collective_bench_measures_time_beyond_the_compute() -> None:
    """plan/bench.py on 2 ranks: each busy point is the compute between collectives (the
    nominal segment's work, sized at the machine's best speed: no shorter than about it, and
    longer only by what other load slows it, well under 10x; a units slip is 1000x) and the
    time a 128 KiB all-reduce between computing ranks adds to it: more than nothing, less than
    half the compute plus 5 ms (a units slip, or the compute counted in, fails at the 16 ms
    point)."""
    import json

    r = mpirun.run(["-m", "mpipipe.plan.bench"], n=2, timeout=120)
    assert r.returncode == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["busy_bytes"] == 128 << 10
    nominal = [0.25e-3, 0.5e-3, 1e-3, 2e-3, 4e-3, 16e-3]
    assert len(got["busy"]) == len(nominal)
    for segment, (compute, lost) in zip(nominal, got["busy"], strict=True):
        assert segment / 2 < compute < 10 * segment, got["busy"]  # the measured compute
        assert 0 < lost < compute / 2 + 5e-3, got["busy"]  # compute not counted in


def test_profiled_compute_replaces_the_roofline() -> None:
    """With a profile, a stage's F/B/W are its layers' timed ones (plus recomputation and the
    action overhead); the profile times the runtime's real layers at the asked shapes."""
    from mpipipe.plan.profiled import Profile

    class Fixed:
        def __init__(self) -> None:
            self.asked: list[tuple[int, int]] = []

        def times(self, b: int, tp: int) -> dict[str, tuple[float, float, float]]:
            self.asked.append((b, tp))
            return {"embed": (1.0, 0.0, 2.0), "block": (10.0, 20.0, 30.0), "head": (3, 4, 5)}

    fixed = Fixed()
    model = dataclasses.replace(GPT(**SMALL), profile=fixed)  # 6 blocks, 2 stages of 3
    c = action_costs(model, Layout(2, 1, 1, "1f1b", 1, 4), ideal(action_overhead_us=1e6))
    assert (c.f, c.b, c.w) == ([32.0, 34.0], [61.0, 65.0], [93.0, 96.0])
    rc = action_costs(model, Layout(2, 2, 1, "1f1b", 1, 2, "full"), ideal())
    assert rc.b == [90.0, 94.0] and fixed.asked[-1] == (4, 1)  # 16 / (dp 2 x m 2)
    times = Profile(16, 2, 8, 32, "float32", repeats=1).times(2, 2)
    assert set(times) == {"embed", "block", "head"}
    assert all(x > 0 for k in ("block", "head") for x in times[k])
    # the optimizer too: the profile's seconds per parameter times the rank's parameters
    fixed.optimizer_rate = lambda name, tp: 1e-3 if (name, tp) == ("adamw", 1) else 0.0
    lay = Layout(2, 1, 1, "1f1b", 1, 4)
    got = predict(model, lay, ideal()).breakdown["optimizer"]
    assert got == pytest.approx(
        1e-3 * max(predict(model, lay, ideal()).memory, key=lambda m: m.params).params
    )
    assert Profile(16, 2, 8, 32, "float32", repeats=1).optimizer_rate("adamw", 1) > 0


def test_megatron_rows_run_the_artifacts_layouts_and_dropout_costs_traffic() -> None:
    from mpipipe.plan.megatron import layout_of, rows

    table = {r["params_b"]: layout_of(r) for r in rows()}
    model, lay = table["76.1"]
    assert (lay.schedule, lay.v, lay.microbatches, lay.micro_batch(model)) == (
        "interleaved", 3, 28, 2)  # fmt: skip
    assert not lay.overlap and lay.recompute == "full" and model.dropout
    model, lay = table["1.7"]
    assert (lay.schedule, lay.microbatches, lay.micro_batch(model), lay.overlap) == (
        "1f1b", 1, 16, True)  # fmt: skip
    selene = load("selene-a100")
    dry = dataclasses.replace(model, dropout=False)
    assert sum(action_costs(model, lay, selene).f) > sum(action_costs(dry, lay, selene).f)
