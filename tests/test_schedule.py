"""Schedules are data: exact lists, the checker's verdicts, lowering and buffer accounting."""

from __future__ import annotations

import pytest

from mpipipe.errors import ConfigError, ScheduleError
from mpipipe.schedule import (
    Action,
    Costs,
    build,
    check,
    forward_only,
    from_text,
    gpipe,
    interleaved,
    lower,
    one_f_one_b,
    parse,
    recv_buffer_peaks,
    zb_h1,
    zbv,
)


def rows(plan):
    return [" ".join(str(a) for a in row) for row in plan.actions]


def test_gpipe_exact():
    assert rows(gpipe(2, 3)) == [
        "F0 F1 F2 B0 W0 B1 W1 B2 W2",
        "F0 F1 F2 B0 W0 B1 W1 B2 W2",
    ]


def test_1f1b_exact():
    # laid out like the timing diagram: warm-up forwards, steady one-forward-one-backward, drain
    assert rows(one_f_one_b(4, 5)) == [
        "F0 F1 F2 F3 B0 W0 F4 B1 W1 B2 W2 B3 W3 B4 W4",
        "F0 F1 F2 B0 W0 F3 B1 W1 F4 B2 W2 B3 W3 B4 W4",
        "F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 F4 B3 W3 B4 W4",
        "F0 B0 W0 F1 B1 W1 F2 B2 W2 F3 B3 W3 F4 B4 W4",
    ]


def test_1f1b_fewer_microbatches_than_stages():
    assert rows(one_f_one_b(4, 2))[0] == "F0 F1 B0 W0 B1 W1"
    assert check(one_f_one_b(4, 2)).peak_stash == [2, 2, 2, 1]


@pytest.mark.parametrize("text", ["F0", "B12", "W3", "F3.1", "SA0", "RG7.2"])
def test_action_round_trip(text):
    assert str(parse(text)) == text


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse action 'X1'"):
        parse("X1")


@pytest.mark.parametrize("pp", range(1, 9))
@pytest.mark.parametrize("m", range(1, 17))
def test_checker_accepts_and_reports_peak_stash(pp, m):
    assert check(gpipe(pp, m)).peak_stash == [m] * pp
    assert check(one_f_one_b(pp, m)).peak_stash == [min(pp - s, m) for s in range(pp)]


def test_bubble_matches_closed_form_without_w_cost():
    # with W free, F and B of equal cost: bubble = (p - 1) / (m + p - 1) for GPipe and 1F1B
    for p, m in [(2, 4), (4, 8), (8, 3)]:
        for plan in (gpipe(p, m), one_f_one_b(p, m)):
            assert check(plan, Costs(f=1, b=1, w=0)).bubble == pytest.approx((p - 1) / (m + p - 1))


def test_deadlock_names_ranks_and_actions():
    plan = from_text("F0 B0 W0 F1 B1 W1\nF1 B1 W1 F0 B0 W0")
    with pytest.raises(ScheduleError) as e:
        check(plan)
    msg = str(e.value)
    assert "deadlock" in msg
    assert "rank 0 at B0 waits for B0 on rank 1" in msg
    assert "rank 1 at F1 waits for F1 on rank 0" in msg
    assert "[B0]" in msg and "[F1]" in msg  # the grid marks the stuck cells


@pytest.mark.parametrize(
    "text, needle",
    [
        ("F0 B0 W0\nF0 W0 B0", "rank 1 step 1: W0 runs before B0"),
        ("F0 B0 W0 F0\nF0 B0 W0", "rank 0 runs F0 2 times"),
        ("F0 B0\nF0 B0 W0", "rank 0 never runs W0"),
        ("F0 B0 W0 F2 B2 W2\nF0 B0 W0", "out of range"),
        ("F0 SA0 B0 W0\nF0 B0 W0", "not a compute action"),
    ],
)
def test_malformed_schedules_rejected(text, needle):
    with pytest.raises(ScheduleError, match=needle):
        check(from_text(text, microbatches=1))


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match="unknown schedule .zb.*1f1b, dualpipev, gpipe, interleaved, v-half, v-min",
    ):
        build("zb", 2, 2)


def test_lowering_pairs_every_send_with_a_receive():
    for plan in (gpipe(4, 6), one_f_one_b(4, 6), forward_only(gpipe(4, 6))):
        low = lower(plan)
        sends = {
            (r + (1 if a.kind == "SA" else -1), a.kind[1], a.mb)
            for r, row in enumerate(low.actions)
            for a in row
            if a.kind in ("SA", "SG")
        }
        recvs = {
            (r, a.kind[1], a.mb)
            for r, row in enumerate(low.actions)
            for a in row
            if a.kind in ("RA", "RG")
        }
        assert sends == recvs
        for row in low.actions:  # a receive is posted before the action that consumes it
            pos = {a: i for i, a in enumerate(row)}
            for a in row:
                if a.kind == "RA":
                    assert pos[a] < pos[Action("F", a.mb)]
                if a.kind == "RG":
                    assert pos[a] < pos[Action("B", a.mb)]
        assert [[a for a in row if a.is_compute] for row in low.actions] == [
            list(row) for row in plan.actions
        ]


def test_single_rank_lowers_to_no_messages():
    assert lower(one_f_one_b(1, 4)).actions == one_f_one_b(1, 4).actions


def test_receive_buffers_are_bounded_by_the_stash():
    low = lower(one_f_one_b(4, 8))
    peaks = [recv_buffer_peaks(row) for row in low.actions]
    assert peaks[0] == {("RG", 0): 2}
    assert peaks[3] == {("RA", 0): 2}
    for s, p in enumerate(peaks[1:3], start=1):
        assert p[("RA", 0)] <= min(4 - s, 8) + 1  # the stash plus the one posted ahead


# -- schedules beyond 1F1B ---------------------------------------------------------------------
ALL = ["gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "v-half", "v-min", "dualpipev"]


def accepted(name, pp):
    """Micro-batch counts up to 32 that schedule `name` takes on `pp` ranks."""
    if name in ("v-half", "v-min", "dualpipev"):  # list-scheduled or long: fewer m (CI time)
        return [m for m in (1, 2, 3, 5, 8, 13, 21, 32) if name != "dualpipev" or m >= 2 * pp]
    return [m for m in range(1, 33) if name != "interleaved" or m % pp == 0]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pp", range(2, 9))
def test_every_schedule_passes_the_checker(name, pp):
    for m in accepted(name, pp):
        plan = build(name, pp, m)
        report = check(plan)
        assert len(report.peak_stash) == pp
        for row in plan.actions:  # W (gradient accumulation) in increasing micro-batch order
            for c in range(len(plan.stages[0])):
                ws = [a.mb for a in row if a.kind == "W" and a.chunk == c]
                assert ws == sorted(ws) == list(range(m))


def test_interleaved_needs_a_multiple_of_pp():
    with pytest.raises(ConfigError, match="6 is not a multiple of 4 .use e.g. --microbatches 8"):
        build("interleaved", 4, 6)


def test_virtual_stages_checked_per_schedule():
    assert len(build("interleaved", 2, 4, 3).stages[0]) == 3
    with pytest.raises(ConfigError, match="--schedule zbv takes --virtual-stages 2, not 3"):
        build("zbv", 2, 4, 3)
    with pytest.raises(ConfigError, match="--schedule 1f1b takes --virtual-stages 1, not 2"):
        build("1f1b", 2, 4, 2)


@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_bubble_closed_form(v):
    for p, m in [(2, 4), (4, 8), (4, 16), (8, 16)]:
        report = check(interleaved(p, m, v), Costs(f=1, b=1, w=0))
        assert report.bubble == pytest.approx((p - 1) / (v * m + p - 1))


def test_zb_h1_has_a_third_of_the_1f1b_bubble():
    p, m = 4, 8
    # the paper's 1F1B runs B and W as one backward pass: idle (p-1)(F+B+W) per rank
    fused = check(one_f_one_b(p, m), Costs(f=1, b=2, w=0))
    zb = check(zb_h1(p, m), Costs(f=1, b=1, w=1))
    assert fused.idle == [(p - 1) * 3.0] * p
    assert zb.idle == [(p - 1) * (1 + 1 - 1.0)] * p
    assert max(zb.idle) <= max(fused.idle) / 3
    # same peak activation memory as 1F1B (its first stage's); ours sends before W: (p-1)(F+B)
    assert max(zb.peak_stash) == max(check(one_f_one_b(p, m)).peak_stash) == p
    assert check(one_f_one_b(p, m)).idle == [(p - 1) * 2.0] * p


def test_zbv_is_a_v_and_keeps_1f1b_memory():
    plan = zbv(4, 8)
    assert plan.stages == ((0, 7), (1, 6), (2, 5), (3, 4))
    report = check(plan)
    assert report.peak_stash == [8] * 4  # 2 * pp half-stage activations = pp full ones
    assert report.bubble < check(one_f_one_b(4, 8)).bubble
    low = lower(plan)  # the tip of the V hands over on rank 3 without messages
    tip = low.actions[3]
    assert not [a for a in tip if (a.kind, a.chunk) in (("SA", 0), ("RA", 1), ("SG", 1))]
    assert len([a for a in tip if (a.kind, a.chunk) == ("SA", 1)]) == 8  # on to rank 2


def test_costs_parse():
    c = Costs.parse("F=1.5, B=2,W=0.5,latency=0.1")
    assert (c.of("F"), c.of("B"), c.of("W"), c.latency) == (1.5, 2.0, 0.5, 0.1)
    with pytest.raises(ValueError, match="cannot read costs 'F=x'"):
        Costs.parse("F=x")
    per_stage = Costs(f=[1, 2], b=[1, 1], w=[0, 0])
    assert check(gpipe(2, 1), per_stage).step_time == 1 + 2 + 1 + 1


def test_deadlock_names_the_cycle():
    plan = from_text("F0 B0 W0 F1 B1 W1\nF1 B1 W1 F0 B0 W0")
    with pytest.raises(ScheduleError, match=r"cycle rank 0 \(B0\) -> rank 1 \(F1\) -> rank 0"):
        check(plan)


def test_timeline_one_column_per_slot():
    from mpipipe.schedule.render import summary, timeline

    report = check(one_f_one_b(2, 2), Costs(f=1, b=2, w=1))
    assert timeline(report).splitlines() == [
        "rank  0 |F0 F1 .. .. B0 ~~ W0 .. B1 ~~ W1",
        "rank  1 |.. F0 B0 ~~ W0 F1 B1 ~~ W1 .. ..",
    ]
    assert "peak stashed activations per rank: [2, 1]" in summary(report)


def test_latency_is_paid_between_ranks_only():
    # F0 [0, 1] | hop | F0 [1.5, 2.5], B0 [2.5, 3.5], W0 | hop | B0 [4, 5], W0 [5, 6]
    assert check(gpipe(2, 1), Costs(latency=0.5)).step_time == 6.0
    # one rank running both arms of the V hands over locally: no hop, no latency
    assert check(zbv(1, 2), Costs(latency=0.5)).step_time == 12.0
