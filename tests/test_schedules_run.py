"""Schedules on real ranks: hand-written schedule files, emulated compute, the schedule tool."""

from __future__ import annotations

import json

import pytest

from tests import mpirun

SMALL = mpirun.TINY


def test_hand_written_schedule_trains_like_1f1b(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text(
        "# 2 ranks, GPipe written by hand\n"
        "F0 F1 F2 F3 B0 W0 B1 W1 B2 W2 B3 W3\n"
        "F0 F1 F2 F3 B0 W0 B1 W1 B2 W2 B3 W3\n"
    )
    mine = mpirun.train(2, *SMALL, "--steps", "3", "--schedule-file", str(f), timeout=60)
    ref = mpirun.train(2, *SMALL, "--steps", "3", "--schedule", "1f1b", timeout=60)
    assert mine.returncode == 0 and ref.returncode == 0, mine.output + ref.output
    assert "schedule mine.txt" in mine.stdout
    losses = [
        [
            ln.split("| loss ")[1].split()[0]
            for ln in r.stdout.splitlines()
            if ln.startswith("step")
        ]
        for r in (mine, ref)
    ]
    assert losses[0] and losses[0] == losses[1]


def test_deadlocking_schedule_file_is_refused_before_training(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("F0 B0 W0 F1 B1 W1 F2 B2 W2 F3 B3 W3\nF1 B1 W1 F0 B0 W0 F2 B2 W2 F3 B3 W3\n")
    r = mpirun.train(2, *SMALL, "--steps", "3", "--schedule-file", str(f), timeout=60)
    assert r.returncode == 2, r.output
    assert "cycle rank 0 (B0) -> rank 1 (F1) -> rank 0" in r.stderr
    assert "step 1/" not in r.stdout


def test_schedule_file_must_match_the_ranks(tmp_path):
    f = tmp_path / "three.txt"
    f.write_text("F0 B0 W0\nF0 B0 W0\nF0 B0 W0\n")
    r = mpirun.train(2, *SMALL, "--microbatches", "1", "--schedule-file", str(f), timeout=60)
    assert r.returncode == 2 and "world size 2 is not a multiple of --pp 3" in r.stderr, r.output


@pytest.mark.parametrize("name", ["1f1b", "zbv"])
def test_emulated_compute_reports_measured_and_predicted(tmp_path, name):
    metrics = tmp_path / "m.jsonl"
    r = mpirun.train(
        4,
        "--layers",
        "8",
        "--steps",
        "3",
        "--microbatches",
        "8",
        "--schedule",
        name,
        "--emulate",
        "F=0.5,B=0.5,W=0.25",
        "--eval-batches",
        "1",
        "--metrics-file",
        str(metrics),
        timeout=120,
    )
    assert r.returncode == 0, r.output
    assert "emulated costs F=0.5,B=0.5,W=0.25" in r.stdout
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    for rec in recs:
        assert rec["loss"] == 0.0  # no math was done
        assert 0.0 <= rec["bubble"] < 1.0 and 0.0 < rec["bubble_predicted"] < 1.0
        assert rec["pipeline_time_s"] > 0 and rec["pipeline_time_predicted_s"] > 0
    assert "bubble measured" in r.stdout and "predicted" in r.stdout


def test_bad_emulate_spec():
    r = mpirun.train(1, "--emulate", "F=fast", "--steps", "1", timeout=60)
    assert r.returncode == 2 and "--emulate: cannot read costs 'F=fast'" in r.stderr, r.output


def test_schedule_tool_timeline_and_plot(tmp_path):
    png = tmp_path / "zb.png"
    r = mpirun.run(
        [
            "-m",
            "mpipipe",
            "schedule",
            "--schedule",
            "zb-h1",
            "--pp",
            "4",
            "--microbatches",
            "8",
            "--costs",
            "F=1,B=1,W=1",
            "--plot",
            str(png),
        ],
        timeout=60,
    )
    assert r.returncode == 0, r.output
    assert "rank  0 |F0 F1 F2 F3 .. .. .. B0 W0 F4" in r.stdout
    assert "idle per rank: [3, 3, 3, 3]" in r.stdout
    assert "peak stashed activations per rank: [4, 4, 4, 4]" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emulated_sleeps_add_up_to_their_cost(monkeypatch):
    """A sleep that wakes 0.3 ms late (timer slack) must not lengthen every emulated action: the
    sleeper owes what it overslept and asks for that much less next time, so the sleeps add up
    to their cost; a wake 6 ms late is repaid over the next actions, none shorter than half."""
    from mpipipe import emulate

    now = [0.0]
    late = [3e-4]

    def late_sleep(s):
        now[0] += s + late[0]

    monkeypatch.setattr(emulate.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(emulate.time, "sleep", late_sleep)
    sleep = emulate._Sleeper()
    durations = []
    for k in range(100):
        late[0] = 6e-3 if k == 50 else 3e-4
        t0 = now[0]
        sleep(5e-3)
        durations.append(now[0] - t0)
    assert durations[0] == pytest.approx(5.3e-3)  # the first one cannot know
    assert durations[1:50] == pytest.approx([5e-3] * 49)
    assert durations[50] == pytest.approx(10.7e-3)  # the stall
    assert min(durations[51:]) >= 2.5e-3 + 3e-4 - 1e-12  # repaid at most half an action a time
    assert sum(durations) == pytest.approx(100 * 5e-3 + 3e-4, rel=1e-9)  # within one late wake
    before = now[0]
    sleep(0.0)
    assert now[0] == before  # zero costs: no system call at all
