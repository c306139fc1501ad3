"""Running it like an HPC code: job scripts, dry runs, scaling studies, traces, the watchdog."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import statistics
import subprocess
from pathlib import Path

import pytest

from mpipipe import schedule
from tests import mpirun

JOBS = sorted((mpirun.ROOT / "jobs").glob("*.sbatch"))


def commands(script: Path) -> list[list[str]]:
    """The mpipipe command lines of a job script, continuation lines joined, shell variables
    expanded against a test environment, '$@' and pipes dropped."""
    text = script.read_text().replace("\\\n", " ")
    env = {
        "SLURM_JOB_ID": "123",
        "CKPT": "/tmp/ckpt-test",
        "SCRATCH": "/tmp",
        "SLURM_CPUS_PER_TASK": "1",
        "HOME": "/tmp",
    }
    out = []
    for line in text.splitlines():
        line = line.split("|")[0].strip()
        if line.startswith("#") or "-m mpipipe" not in line:
            continue
        words = shlex.split(line)
        words = words[words.index("-m") + 2 :]  # after "python -m mpipipe"
        words = [
            re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), w)
            for w in words
            if w != "$@"
        ]
        out.append(words)
    return out


def ntasks(script: Path) -> int:
    text = script.read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    return nodes * per


@pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])
def test_job_script_syntax_and_command_lines(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "CHANGE" in script.read_text()  # the header says what to edit
    cmds = commands(script)
    assert cmds, "no mpipipe command line found"
    for words in cmds:
        if words[0] == "train":
            res = mpirun.run(["-m", "mpipipe", *words, "--dry-run"], n=ntasks(script), timeout=180)
            assert res.returncode == 0 and "dry run:" in res.stdout, res.output
        else:
            assert words[0] == "study"
            res = mpirun.run(["-m", "mpipipe", *words, "--dry-run"], timeout=120)
            assert res.returncode == 0 and res.stdout.count("ok:") == 4, res.output


def test_dry_run_shows_placement_and_schedule():
    r = mpirun.train(4, "--dry-run", "--pp", "2", "--microbatches", "2", timeout=60)
    assert r.returncode == 0, r.output
    lines = r.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("rank  host"))) + 1 :]
    rows = [line.split() for line in itertools.takewhile(lambda x: x.startswith(" "), table)]
    assert [(int(w[0]), int(w[2]), w[3], int(w[4]), int(w[5])) for w in rows] == [
        (0, 0, "cpu", 0, 0),
        (1, 1, "cpu", 0, 1),
        (2, 2, "cpu", 1, 0),
        (3, 3, "cpu", 1, 1),
    ]
    assert "rank  0 |F0 F1 .. B0 W0 .. B1 W1" in r.stdout
    assert "step 1/" not in r.stdout


@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_scaling_study_with_emulated_compute(tmp_path, mode):
    out = tmp_path / mode
    r = mpirun.run(
        [
            "-m",
            "mpipipe",
            "study",
            "--ranks",
            "1,2,4,8" if mode == "strong" else "1,2,4",
            "--mode",
            mode,
            "--out",
            str(out),
            "--layers",
            "8",
            "--steps",
            "3",
            "--microbatches",
            "8",
            "--global-batch",
            "16",
            "--emulate",
            "F=0.5,B=0.5,W=0.5",
            "--eval-batches",
            "1",
            *(["--predict", "selene-a100"] if mode == "weak" else []),
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    if mode == "weak":  # the planner's figure for each run, beside the measurement
        from mpipipe.plan.machine import load
        from mpipipe.plan.validate import prediction
        from mpipipe.study import runs

        flags = "--layers 8 --steps 3 --microbatches 8 --global-batch 16 --emulate "
        flags += "F=0.5,B=0.5,W=0.5 --eval-batches 1"
        for row, (n, run_flags) in zip(rows, runs([1, 2, 4], mode, flags.split()), strict=True):
            want = prediction(n, run_flags, load("selene-a100")).tokens_per_s
            assert float(row["predicted_tokens_per_s"]) == pytest.approx(want, rel=1e-6)
        assert "predicted tokens/s" in (out / "results.md").read_text()
    assert [int(x["ranks"]) for x in rows] == ([1, 2, 4, 8] if mode == "strong" else [1, 2, 4])
    for row in rows:  # the table holds what the runs measured
        n = int(row["ranks"])
        recs = [json.loads(line) for line in (out / f"run_{n:04d}.jsonl").read_text().splitlines()]
        later = [x["tokens_per_s"] for x in recs[1:]]
        assert float(row["tokens_per_s"]) == pytest.approx(statistics.median(later))
        assert int(row["pp"]) * int(row["dp"]) == n
        want_batch = 16 * n if mode == "weak" else 16
        assert int(row["global_batch"]) == want_batch
        assert float(row["speedup"]) == pytest.approx(
            float(row["tokens_per_s"]) / float(rows[0]["tokens_per_s"])
        )
    md = (out / "results.md").read_text()
    assert "EMULATED" in md and md.count("\n| ") == len(rows) + 1  # the header and a row per run
    for png in ("throughput.png", "efficiency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_trace_spans_match_the_schedule(tmp_path):
    trace = tmp_path / "t.json"
    flags = ["--global-batch", "16", "--pp", "2", "--steps", "4", "--schedule", "zb-h1"]
    r = mpirun.train(
        4, *mpirun.TINY, *flags, "--trace", str(trace), "--trace-steps", "2", timeout=120
    )
    assert r.returncode == 0, r.output
    events = json.loads(trace.read_text())["traceEvents"]
    plan = schedule.build("zb-h1", 2, 4)
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert len(names) == 4 and "stage 1, replica 0" in names[2]
    for rank in range(4):
        stage = 0 if rank < 2 else 1  # dp contiguous
        for step in (2, 3):
            spans = sorted(
                (
                    e
                    for e in events
                    if e.get("pid") == rank
                    and e.get("ph") == "X"
                    and e["args"].get("step") == step
                ),
                key=lambda e: e["ts"],
            )
            compute = [
                e["name"] for e in spans if e["cat"] == "compute" and e["name"] != "optimizer"
            ]
            assert compute == [str(a) for a in plan.actions[stage]], (rank, step)
            assert "gradient all-reduce" in [e["name"] for e in spans]
            assert spans[-1]["name"] == "optimizer"
            assert all(e["dur"] >= 0 for e in spans)


@pytest.mark.openmpi  # a rank stuck in MPI is named and the job ends
def test_watchdog_names_the_stalled_rank_and_ends_the_job():
    flags = [*mpirun.TINY, "--steps", "50", "--timeout-s", "4", "--inject-fault", "stall@1:2"]
    r = mpirun.train(2, *flags, timeout=60)
    assert r.returncode != 0
    assert r.seconds < 30
    lines = [ln for ln in r.stderr.splitlines() if "mpipipe: watchdog:" in ln]
    assert lines, r.stderr
    assert "rank 1" in lines[0] and "in step 3" in lines[0]  # the stalled rank is named
    assert "(--timeout-s 4)" in lines[0]


def test_watchdog_pauses_for_long_work_without_beats():
    """A checkpoint save longer than --timeout-s is work, not a hang."""
    import time as _time

    from mpipipe.watchdog import Watchdog

    fired = []
    wd = Watchdog(0.3, 0, fired.append)
    with wd.paused("saving a checkpoint"):
        _time.sleep(0.8)
    _time.sleep(0.1)
    assert not fired
    _time.sleep(0.6)  # and it watches again afterwards
    wd.close()
    assert fired == [3]


@pytest.mark.parametrize("status,requeued,code", [(75, True, 0), (0, False, 0), (1, False, 1)])
def test_train_job_requeues_on_exit_status_75_only(tmp_path, status, requeued, code):
    """The requeue contract of jobs/train.sbatch is mpipipe's exit status, not its log text."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho stopped by SIGUSR1\nexit {status}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.txt\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MPIPIPE_VENV": str(venv),
        "SLURM_JOB_ID": "123",
        "HOME": str(tmp_path),
    }
    script = mpirun.ROOT / "jobs" / "train.sbatch"
    r = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == code, r.stderr
    called = tmp_path / "scontrol.txt"
    assert called.exists() is requeued
    if requeued:
        assert called.read_text().split() == ["requeue", "123"]


def test_study_reads_its_runs_from_the_parsed_config(tmp_path):
    """With --config, the weak-scaling base batch and the table come from the TOML (the study
    once parsed train flags by hand and saw only the command line)."""
    from mpipipe.study import runs, summarize

    toml = tmp_path / "run.toml"
    toml.write_text('global_batch = 24\nmicrobatches = 3\nschedule = "gpipe"\n')
    plan = runs([1, 2], "weak", ["--config", str(toml)])
    assert [flags[-2:] for _, flags in plan] == [
        ["--global-batch", "24"],
        ["--global-batch", "48"],
    ]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"pp": 1, "dp": 2, "tokens_per_s": 1.0, "step_time_s": 1.0,
                             "bubble": 0.0}) + "\n")  # fmt: skip
    row = summarize(2, plan[1][1], m)
    assert (row["global_batch"], row["microbatches"], row["schedule"]) == (48, 3, "gpipe")
