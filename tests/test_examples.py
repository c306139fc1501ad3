"""The programs in examples/ run as documented."""

from __future__ import annotations

import pytest

from tests import mpirun


@pytest.mark.openmpi  # the Python API under mpiexec
def test_custom_model_on_four_ranks():
    r = mpirun.run(["examples/custom_model.py"], n=4, timeout=120)
    assert r.returncode == 0, r.output
    assert "custom model of 6 layers" in r.stdout and "pp=4" in r.stdout
    assert "done: 60 steps" in r.stdout


def test_custom_model_single_process_matches_four_ranks():
    one = mpirun.run(["examples/custom_model.py"], timeout=120)
    four = mpirun.run(["examples/custom_model.py"], n=4, timeout=120)
    assert one.returncode == 0 and four.returncode == 0, one.output + four.output
    losses = [
        line.split("| loss ")[1].split()[0]
        for line in one.stdout.splitlines()
        if line.startswith("step")
    ]
    assert losses and losses == [
        line.split("| loss ")[1].split()[0]
        for line in four.stdout.splitlines()
        if line.startswith("step")
    ]


def test_show_schedule():
    r = mpirun.run(["examples/show_schedule.py"], timeout=60)
    assert r.returncode == 0, r.output
    assert "peak stashed activations per rank: [4, 3, 2, 1]" in r.stdout
    assert "rejected as expected" in r.stdout and "deadlocks" in r.stdout


def test_schedule_command_reads_a_hand_written_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# two ranks, GPipe by hand\nF0 F1 B0 W0 B1 W1\nF0 F1 B0 W0 B1 W1\n")
    r = mpirun.run(["-m", "mpipipe", "schedule", "--file", str(f)], timeout=60)
    assert r.returncode == 0, r.output
    assert "peak stashed activations per rank: [2, 2]" in r.stdout
    f.write_text("F0 B0 W0 F1 B1 W1\nF1 B1 W1 F0 B0 W0\n")
    r = mpirun.run(["-m", "mpipipe", "schedule", "--file", str(f)], timeout=60)
    assert r.returncode == 2 and "deadlocks" in r.stderr
