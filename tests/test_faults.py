"""Faults: every file the runtime reads in every broken form, checkpoints that are never lost,
saves that fail (injected ENOSPC/EACCES/EDQUOT/EIO at the h5py write, and a real full tmpfs),
unwritable checkpoint directories, eval from another directory, metrics after resume (signals:
tests/test_signals.py).

In-process runs use MPI.COMM_SELF (fast, and monkeypatch reaches them); the multi-rank claims
(every rank stops together, no hang) run under mpiexec, most of them in ONE launch of
tests/scripts/fault_cases.py."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from mpipipe import checkpoint
from mpipipe.checkpoint import files
from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError
from mpipipe.metrics import MetricsFile
from tests import mpirun

TINY = mpirun.TINY
QUIET = ["--eval-every", "0", "--log-every", "100", "--peak-tflops", "1"]


def train_here(**kw) -> tuple[object, str]:
    """One in-process run on COMM_SELF with the tiny model; returns (result, what it printed)."""
    from mpi4py import MPI

    from mpipipe.trainer import train

    cfg = TrainConfig(
        layers=4, d_model=32, heads=2, seq_len=16, global_batch=8, microbatches=4,
        eval_batches=1, eval_every=0, log_every=100, peak_tflops=1.0, timeout_s=0, **kw,
    )  # fmt: skip
    out = io.StringIO()
    return train(cfg, comm=MPI.COMM_SELF, out=out), out.getvalue()


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory holding step_000002 only, written by 2 ranks (2 shards)."""
    d = tmp_path_factory.mktemp("one") / "ck"
    r = mpirun.train(2, *TINY, *QUIET, "--steps", "2", "--checkpoint-dir", str(d), timeout=120)
    assert r.returncode == 0, r.output
    return d


# -- every file the runtime reads, in every broken form -------------------------------------------
FORMS = ["missing", "empty", "truncated", "garbage", "other-version"]


def other_version(path: Path) -> None:
    """What another mpipipe version (or another program) might have left under that name."""
    if path.name == "manifest.json":
        m = json.loads(path.read_text())
        m["version"] = 1
        path.write_text(json.dumps(m))
    elif path.name == "latest":
        path.write_text(json.dumps({"latest": 2}))
    elif path.suffix == ".h5":
        path.unlink()
        with h5py.File(path, "w") as f:
            f.attrs["magic"], f.attrs["version"] = "mpipipe-checkpoint-v1", 1
            f["weights"] = [1.0, 2.0]
    else:  # the TOML config
        path.write_text("[model]\nwidth = 64\n")


def damage(path: Path, form: str) -> None:
    data = path.read_bytes()
    if form == "missing":
        path.unlink()
    elif form == "empty":
        path.write_bytes(b"")
    elif form == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif form == "garbage":
        path.write_bytes(os.urandom(max(len(data), 64)))
    else:
        other_version(path)


# file -> (what reads it, the expected exit status, a word the one line must hold)
READERS = {
    "manifest.json": [("resume", 2), ("verify", 2)],
    "shard_000.h5": [("resume", 2), ("verify", 1)],
    "model.h5": [("resume", 0), ("verify", 1), ("export", 2)],  # only the tools read the view
    "latest": [("resume", 0)],  # a hint: the step directories decide, with a note
    "run.toml": [("config", 2)],
}


def case_argv(reader: str, d: Path, tmp: Path) -> list[str]:
    train = ["train", *TINY, *QUIET, "--steps", "3"]
    return {
        "resume": [*train, "--checkpoint-dir", str(d), "--resume", "auto"],
        "verify": ["ckpt", "verify", str(d)],
        "export": ["ckpt", "export", str(d), str(tmp / "all.h5")],
        "config": [*train, "--config", str(tmp / "run.toml")],
    }[reader]


@pytest.mark.openmpi  # one line per rank, without the launcher's own notice
def test_every_file_in_every_broken_form_gets_one_line_on_every_rank(one_checkpoint, tmp_path):
    """One launch of 2 ranks runs every (file, form, reader): each ends with its documented
    status (on both ranks for train; the ckpt tools use no MPI and run on rank 0), an error is
    one line naming the file, printed by rank 0 only, and nothing raises."""
    cases, expect = [], {}
    for file, readers in READERS.items():
        for form in FORMS:
            for reader, status in readers:
                cid = f"{file}/{form}/{reader}"
                tmp = tmp_path / cid.replace("/", "-")
                d = tmp / "ck"
                shutil.copytree(one_checkpoint, d)
                (tmp / "run.toml").write_text("steps = 3\n")
                target = tmp / "run.toml" if file == "run.toml" else d / "step_000002" / file
                damage(d / file if file == "latest" else target, form)
                everywhere = reader in ("resume", "config")
                cases.append(
                    {"id": cid, "argv": case_argv(reader, d, tmp), "everywhere": everywhere}
                )
                expect[cid] = status
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "latest").write_text("step_000004\n")  # and no step directory
    cases.append(
        {
            "id": "latest/only/resume",
            "argv": case_argv("resume", bare, tmp_path),
            "everywhere": True,
        }
    )
    expect["latest/only/resume"] = 2
    spec, out = tmp_path / "cases.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    r = mpirun.run(["tests/scripts/fault_cases.py", str(spec), str(out)], n=2, timeout=240)
    assert r.returncode == 0, r.output
    results = json.loads(out.read_text())
    failures = [f"{cid}: {problem}" for cid, status in expect.items()
                if (problem := judge(cid, status, results[cid]))]  # fmt: skip
    assert not failures, "\n\n".join(failures)


def judge(cid: str, status: int, ranks: list[dict | None]) -> str | None:
    """What is wrong with one case's outcome (None: as documented)."""
    file, form, reader = cid.split("/")
    ran = [x for x in ranks if x is not None]
    text = "".join(x["stdout"] + x["stderr"] for x in ran)
    codes, err0, out0 = [x["code"] for x in ran], ran[0]["stderr"], ran[0]["stdout"]
    if codes != [status] * len(ran):
        return f"exit {codes}, expected {status}\n{text}"
    if "Traceback" in text:
        return f"a traceback\n{text}"
    if status == 2:
        if not (err0.count("\n") == 1 and err0.startswith("mpipipe: error:") and file in err0):
            return f"not one error line naming {file}\n{text}"
        if any(x["stderr"] for x in ran[1:]):
            return f"an error printed by rank 1 too\n{text}"
    if status == 1 and not any(
        line.startswith("BAD ") and file in line for line in out0.splitlines()
    ):
        return f"no BAD line naming {file}\n{text}"
    if status == 0 and reader == "resume":
        if "resumed from" not in out0 or "step 3/3" not in out0:
            return f"did not resume\n{text}"
        if file == "latest" and form != "missing" and "latest" not in out0:
            return f"no note about latest\n{text}"
    return None


def test_a_resume_refuses_another_model_naming_the_field(one_checkpoint):
    r = mpirun.train(
        2, *TINY, *QUIET, "--heads", "4", "--steps", "3", "--checkpoint-dir",
        str(one_checkpoint), "--resume", "auto", timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.output
    assert r.program_stderr.count("\n") == 1
    assert "holds a model with --heads 2, this run has --heads 4" in r.stderr
    assert "Traceback" not in r.output


# -- checkpoints are never lost -------------------------------------------------------------------
def test_resume_auto_passes_over_a_checkpoint_without_manifest(tmp_path):
    """The issue's repro on 4 ranks: the newest checkpoint lost its manifest; --resume auto used
    to start fresh and overwrite step_000002. It must resume from it, and the metrics file must
    hold each step once."""
    t = [*TINY, "--seq-len", "32", "--log-every", "1"]
    d, metrics = tmp_path / "c", tmp_path / "m.jsonl"
    common = ["--save-every", "2", "--checkpoint-dir", str(d), "--metrics-file", str(metrics)]
    r = mpirun.train(4, *t, "--steps", "4", *common, timeout=120)
    assert r.returncode == 0, r.output
    (d / "step_000004" / "manifest.json").unlink()
    r = mpirun.train(4, *t, "--steps", "6", *common, "--resume", "auto", timeout=120)
    assert r.returncode == 0, r.output
    assert "starting fresh" not in r.stdout
    assert f"skipping step_000004: {d}/step_000004/manifest.json: missing" in r.stdout
    assert f"resumed from {d / 'step_000002'} (step 2)" in r.stdout
    assert "step 3/6" in r.stdout and "step 1/6" not in r.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    v = mpirun.run(["-m", "mpipipe", "ckpt", "verify", str(d)], timeout=60)
    assert v.returncode == 0 and "step_000006: OK" in v.stdout, v.output


def test_no_checkpoint_at_all_starts_fresh_and_entries_that_all_fail_stop(tmp_path):
    d = tmp_path / "ck"
    _, out = train_here(steps=1, checkpoint_dir=str(d), resume="auto")
    assert "no checkpoint in" in out and "starting fresh" in out
    for p in d.iterdir():
        if p.is_dir():
            (p / "manifest.json").write_text("{")
    with pytest.raises(checkpoint.Damaged) as e:
        train_here(steps=2, checkpoint_dir=str(d), resume="auto")
    assert "no usable checkpoint in" in str(e.value) and "nothing overwritten" in str(e.value)
    assert "step_000001/manifest.json: not valid JSON" in str(e.value)
    assert (d / "step_000001" / "manifest.json").read_text() == "{"  # untouched


def test_latest_pointing_nowhere_does_not_hide_step_directories(tmp_path):
    d = tmp_path / "ck"
    train_here(steps=2, save_every=1, checkpoint_dir=str(d))
    (d / "latest").write_text("step_000099\n")
    _, out = train_here(steps=3, checkpoint_dir=str(d), resume="auto")
    assert "latest names step_000099; using step_000002" in out
    assert f"resumed from {d / 'step_000002'} (step 2)" in out
    (d / "latest").unlink()
    _, out = train_here(steps=4, checkpoint_dir=str(d), resume="auto")
    assert f"resumed from {d / 'step_000003'} (step 3)" in out


def test_leftovers_of_killed_saves_are_removed_at_start(tmp_path):
    d = tmp_path / "ck"
    train_here(steps=2, save_every=1, checkpoint_dir=str(d))
    (d / ".tmp-step_000003-4242").mkdir()
    (d / ".tmp-step_000003-4242" / "shard_000.h5").write_bytes(b"partial")
    (d / ".latest.tmp").write_text("step_0")
    os.rename(d / "step_000002", d / ".old-step_000002-4242")  # killed between the renames
    _, out = train_here(steps=3, checkpoint_dir=str(d), resume="auto")
    assert "removed" in out and ".tmp-step_000003-4242" in out
    assert f"restored {d / 'step_000002'}" in out
    assert f"resumed from {d / 'step_000002'} (step 2)" in out
    assert sorted(p.name for p in d.iterdir()) == [
        "latest", "step_000001", "step_000002", "step_000003",
    ]  # fmt: skip


def test_keep_last_counts_only_usable_checkpoints(tmp_path):
    d = tmp_path / "ck"
    train_here(steps=5, save_every=1, checkpoint_dir=str(d))
    (d / "step_000005" / "shard_000.h5").write_bytes(b"cut")  # the newest is damaged
    train_here(
        steps=4, save_every=1, keep_last=2, checkpoint_dir=str(d), resume=str(d / "step_000002")
    )
    names = sorted(p.name for p in d.glob("step_*"))
    assert names == ["step_000003", "step_000004", "step_000005"], names  # 2 good + the damaged
    assert (d / "step_000005" / "shard_000.h5").read_bytes() == b"cut"  # left for the user
    train_here(steps=1, save_every=1, keep_last=1, checkpoint_dir=str(d))  # a fresh run
    names = sorted(p.name for p in d.glob("step_*"))
    assert names == ["step_000001", "step_000004", "step_000005"], names  # newest good stays


# -- failures while saving ------------------------------------------------------------------------
def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the files")
@pytest.mark.parametrize("code", ["ENOSPC", "EACCES", "EDQUOT", "EIO"])
@pytest.mark.parametrize("where", ["shard_000.h5", "model.h5"])
def test_a_failed_save_names_path_and_errno_and_keeps_the_previous_one(
    tmp_path, monkeypatch, code, where
):
    """An OSError injected where h5py writes (the shard, or the one-file view rank 0 writes
    last): one SaveError line with the path and errno, no temporary directory left, the
    previous checkpoint and `latest` untouched and still verifying."""
    d = tmp_path / "ck"
    train_here(steps=2, checkpoint_dir=str(d))
    real = files._pwrite

    def failing(fd, data, offset):
        if where in fd_path(fd):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real(fd, data, offset)

    monkeypatch.setattr(files, "_pwrite", failing)
    with pytest.raises(checkpoint.SaveError) as e:
        train_here(steps=4, checkpoint_dir=str(d), resume="auto")
    msg = str(e.value)
    assert msg.startswith("could not save step_000004: ") and "\n" not in msg, msg
    assert f"{where}: {code} ({os.strerror(getattr(errno, code))})" in msg, msg
    assert "the previous checkpoint and" in msg and "unchanged" in msg
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_000002"]
    assert (d / "latest").read_text() == "step_000002\n"
    assert checkpoint.verify(d / "step_000002") == []


def test_h5py_errors_without_errno_still_make_one_clear_line():
    e = OSError("Unable to synchronously create file (unable to open file: name = 'x.h5', "
                "errno = 28, error message = 'No space left on device', flags = 13)")  # fmt: skip
    assert checkpoint.io_error(e, "x.h5") == "x.h5: ENOSPC (No space left on device)"
    assert checkpoint.io_error(RuntimeError("Can't decrement id ref count\nmore"), "y.h5") == (
        "y.h5: Can't decrement id ref count"
    )


def unshare() -> list[str] | None:
    """A private mount namespace (`unshare -rm`), where a test may mount a tiny or read-only
    tmpfs without touching the machine's mounts; None where that is not allowed."""
    cmd = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || exit 3"]
    try:
        ok = subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-rm", "sh", "-c"] if ok else None


def in_tmpfs(options: str, mount: Path, argv: list[str], timeout: float = 120) -> mpirun.Result:
    """Run mpiexec ARGV with a tmpfs (mount OPTIONS) at MOUNT seen only by that job."""
    prefix = unshare()
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (unshare -rm / mount not allowed)")
    mount.mkdir(parents=True, exist_ok=True)
    line = " ".join(f"'{a}'" for a in argv)
    script = f"mount -t tmpfs -o {options} tmpfs '{mount}' && exec {line}"
    t0 = time.perf_counter()
    p = subprocess.run([*prefix, script], cwd=mpirun.ROOT, env=mpirun.env(),
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return mpirun.Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def test_disk_full_on_a_real_tmpfs(tmp_path):
    """2 ranks on a 1400 KiB tmpfs: the first save fits, the second does not (no space): one
    line naming the file and ENOSPC, exit 2, no segfault or h5py traceback, nothing left."""
    mnt = tmp_path / "mnt"
    argv = [mpirun.mpiexec(), "-n", "2", sys.executable, "-m", "mpipipe", "train", *TINY, *QUIET,
            "--steps", "4", "--save-every", "1", "--checkpoint-dir", f"{mnt}/ck"]  # fmt: skip
    script = (
        " ".join(f"'{a}'" for a in argv)
        + f"; echo status=$?; ls -a '{mnt}/ck'; cat '{mnt}/ck/latest'"
    )
    r = in_tmpfs("size=1400k", mnt, ["sh", "-c", script])
    assert "status=2" in r.stdout, r.output
    assert r.stderr.count("mpipipe: error: could not save step_0000") == 1, r.stderr
    assert "ENOSPC (No space left on device)" in r.stderr and "Traceback" not in r.output
    assert r.program_stderr.count("\n") == 1, r.stderr
    saved = [line for line in r.stdout.splitlines() if line.startswith("step_0000")]
    assert len(saved) >= 2 and ".tmp-step" not in r.stdout, r.stdout  # dirs, then latest
    assert saved[-1] == saved[-2], r.stdout  # latest names the newest complete one


@pytest.mark.parametrize("kind", ["read-only", "a file"])
def test_an_unwritable_checkpoint_dir_is_refused_before_step_one(tmp_path, kind):
    if kind == "a file":
        (tmp_path / "ck").write_text("not a directory")
        r = mpirun.train(2, *TINY, *QUIET, "--steps", "3", "--checkpoint-dir",
                         str(tmp_path / "ck"), timeout=60)  # fmt: skip
        assert "is a file, not a directory" in r.stderr, r.output
    else:
        mnt = tmp_path / "ro"
        argv = [mpirun.mpiexec(), "-n", "2", sys.executable, "-m", "mpipipe", "train", *TINY,
                *QUIET, "--steps", "3", "--checkpoint-dir", f"{mnt}/ck"]  # fmt: skip
        r = in_tmpfs("ro,size=64k", mnt, argv)
        assert "is not writable" in r.stderr and "EROFS" in r.stderr, r.output
    assert r.returncode == 2 and r.program_stderr.count("\n") == 1, r.output
    assert "step 1/" not in r.stdout and "Traceback" not in r.output


# -- eval from elsewhere, metrics after resume ----------------------------------------------------
def test_eval_does_not_depend_on_the_training_directory(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    base = [sys.executable, "-m", "mpipipe"]
    t = subprocess.run([*base, "train", *TINY, *QUIET, "--steps", "1", "--data", "corpus.txt",
                        "--checkpoint-dir", "ck"], cwd=work, env=mpirun.env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert t.returncode == 0, t.stdout + t.stderr
    manifest = json.loads((work / "ck" / "step_000001" / "manifest.json").read_text())
    assert manifest["config"]["data"] == str(work / "corpus.txt")
    e = subprocess.run([*base, "eval", "--resume", str(work / "ck"), "--batches", "1"],
                       cwd=elsewhere, env=mpirun.env(), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert e.returncode == 0 and "bits per byte" in e.stdout, e.stdout + e.stderr


def test_metrics_file_keeps_each_step_once_across_resumes(tmp_path):
    f = tmp_path / "m.jsonl"
    m = MetricsFile(str(f))
    for step in range(1, 7):
        m.write({"step": step, "loss": 1.0})
    m.close()
    with open(f, "a") as fh:
        fh.write('{"step": 7, "lo')  # a run killed mid-line
    m = MetricsFile(str(f), append=True)  # resumed from the checkpoint at step 2
    for step in (3, 4):
        m.write({"step": step, "loss": 2.0})
    m.close()
    recs = [json.loads(line) for line in f.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]


def test_config_errors_from_a_manifest_name_it(tmp_path):
    d = tmp_path / "ck"
    train_here(steps=1, checkpoint_dir=str(d))
    path = d / "step_000001" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["recompute"] = "ful"
    path.write_text(json.dumps(m))
    from mpipipe.inference import config_of

    with pytest.raises(ConfigError, match=r"manifest.json: recompute = 'ful' is not one of"):
        config_of(str(d))
