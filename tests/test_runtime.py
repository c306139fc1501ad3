"""The rank runtime: one way to build a rank (train, dry run, eval), bookkeeping that does not grow
with the world, typed optimizers, fault hooks, non-finite numbers, 16-bit messages on any MPI."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from mpipipe import launch, optim
from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError
from mpipipe.faults import Faults
from mpipipe.stats import StepStats
from tests import mpirun

EMULATED = ["--emulate", "F=0.2,B=0.2,W=0.2", "--eval-every", "0", "--log-every", "100"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_with_emulated_costs_prints_the_emulated_timeline():
    r = mpirun.train(2, *mpirun.TINY, "--dry-run", "--emulate", "F=1,B=1,W=1", timeout=60)
    assert r.returncode == 0, r.output
    assert "emulated costs F=1,B=1,W=1" in r.stdout
    assert "transport: host arrays: plain MPI" in r.stdout
    assert "dry run: configuration, layout and schedule are valid" in r.stdout


def test_step_statistics_do_not_grow_with_the_number_of_ranks(tmp_path):
    sizes = {}
    for n in (2, 16):
        m = tmp_path / f"{n}.jsonl"
        flags = [*mpirun.TINY, *EMULATED, "--pp", "2", "--global-batch", "32"]
        r = mpirun.train(n, *flags, "--steps", "2", "--metrics-file", str(m), timeout=180)
        assert r.returncode == 0, r.output
        rec = records(m)[-1]
        assert rec["dp"] == n // 2
        sizes[n] = rec["stats_bytes"]
    assert sizes[2] == sizes[16], sizes
    layers, stages, pp = 6, 2, 2  # embedding, 4 blocks, head
    assert sizes[2] == 8 * ((layers + 3 * stages + 2) + (3 + 2 * pp))


def test_step_statistics_reduce_sums_and_maxima():
    """StepStats round trip on one rank: what goes in comes out, in the right slots."""
    from mpi4py import MPI

    from mpipipe.parallel.transport import Transport

    st = StepStats(n_layers=3, n_stages=4, pp=2)
    st.layer_sq[:] = [1, 2, 3]
    st.costs[1, 3] = 0.5
    st.loss_sum, st.busy, st.wall, st.exposed, st.signum = 7.0, 2.0, 3.0, 0.25, 15
    st.rss_mb[1], st.stash_mb[0] = 100.0, 4.0
    st.reduce(Transport(), MPI.COMM_SELF)
    assert st.layer_sq.tolist() == [1, 2, 3] and st.costs[1, 3] == 0.5
    assert (st.loss_sum, st.busy, st.wall, st.exposed, st.signum) == (7.0, 2.0, 3.0, 0.25, 15)
    assert st.rss_mb.tolist() == [0.0, 100.0] and st.stash_mb.tolist() == [4.0, 0.0]


@pytest.mark.openmpi  # Open MPI 4.1 has no float16 datatype
def test_fp16_pipeline_and_data_parallel_on_any_mpi(tmp_path):
    """fp16 activations cross MPI as raw bytes, fp16 gradient buckets are summed in float32:
    nothing needs an MPI float16 datatype (Open MPI 4.1 has none)."""
    m = tmp_path / "m.jsonl"
    flags = [*mpirun.TINY, "--dtype", "fp16", "--pp", "2", "--steps", "4", "--eval-every", "0"]
    r = mpirun.train(4, *flags, "--metrics-file", str(m), timeout=120)
    assert r.returncode == 0, r.output
    recs = records(m)
    assert recs[-1]["dp"] == 2 and all(np.isfinite(x["loss"]) for x in recs)


def test_a_non_finite_loss_stops_before_the_update_and_saves_nothing_bad(tmp_path):
    d = tmp_path / "ck"
    flags = [*mpirun.TINY, "--lr", "1e6", "--warmup", "0", "--steps", "30", "--eval-every", "0"]
    r = mpirun.train(2, *flags, "--checkpoint-dir", str(d), "--save-every", "1", timeout=120)
    assert r.returncode == 4, r.output
    line = [ln for ln in r.stderr.splitlines() if "gradient norm" in ln]
    assert len(line) == 1 and line[0].startswith("mpipipe: error: step "), r.stderr
    assert "Traceback" not in r.stderr
    v = mpirun.run(["-m", "mpipipe", "ckpt", "verify", str(d)], timeout=60)
    assert v.returncode == 0, v.output  # the newest checkpoint is a finite, verified one


def test_faults_parse_and_refuse_bad_specs():
    f = Faults.parse("raise@2:3, stall@1:0")
    assert len(f.planned) == 2
    f.step(0, 3)  # not rank 2: nothing happens
    with pytest.raises(RuntimeError, match="fault injected on rank 2 at step 3"):
        f.step(2, 3)
    for bad in ("raise", "boom@1:2", "raise@x:1"):
        with pytest.raises(ConfigError, match="--inject-fault"):
            Faults.parse(bad)
    with pytest.raises(ConfigError, match="--inject-fault"):
        TrainConfig(inject_fault="raise@1").validate()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_every_optimizer_follows_one_protocol(name):
    """Plain and mixed-precision optimizers answer the same calls; only fp16 skips overflows."""
    params = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    for dtype in ("float32", "fp16"):
        p = {k: v.astype(np.float16 if dtype == "fp16" else np.float32) for k, v in params.items()}
        opt = optim.make(name, p, TrainConfig(dtype=dtype, optimizer=name))
        grads = {k: np.full_like(v, 0.5) for k, v in p.items()}
        opt.step(grads, 1e-2, factor=0.5)
        t, slots = opt.state_dict()
        assert slots and all(set(s) == {"w", "b"} for s in slots.values())
        assert opt.overflowed() is (dtype == "fp16")
        assert bool(opt.scalars()) is (dtype == "fp16")
        opt.load_state(t, opt.scalars())
        assert opt.loss_scale == (2.0**14 if dtype == "fp16" else 1.0)  # halved by overflow


def test_a_data_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    """(As root, permissions cannot make a file unreadable; a directory where a file is expected
    fails the same open.)"""
    from mpipipe.data.sources import open_source

    bad = tmp_path / "b.txt"
    bad.mkdir()
    with pytest.raises(ConfigError, match=r"--data .*b\.txt: cannot be read \(Is a directory\)"):
        open_source(bad, None, None, "--data")


def test_a_test_script_that_raises_on_one_rank_fails_in_seconds(tmp_path):
    """tests/mpirun.py runs scripts under mpi4py's runner: rank 1's exception aborts the job
    while rank 0 waits in a barrier (without it, rank 0 waits until the launcher's timeout)."""
    script = tmp_path / "crash.py"
    script.write_text(
        "from mpi4py import MPI\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    raise RuntimeError('boom on rank 1')\n"
        "MPI.COMM_WORLD.Barrier()\n"
    )
    r = mpirun.run([str(script)], n=2, timeout=100)
    assert r.returncode != 0 and "boom on rank 1" in r.stderr, r.output
    assert r.seconds < 50, r.seconds  # a hang would reach the 100 s timeout


def test_freed_host_memory_is_kept_unless_the_user_set_the_allocator():
    from mpipipe.runtime import reuse_host_memory

    assert reuse_host_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) is False  # the user's choice
    assert reuse_host_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
    glibc = platform.libc_ver()[0] == "glibc"
    assert reuse_host_memory({}) is glibc  # mallopt accepted both settings


def test_a_persistent_receive_takes_every_step_s_message_and_close_frees_it():
    """`recv_init`: the executor's receives, one MPI persistent request each, started per step
    into the same buffer (here on COMM_SELF: a rank sending to itself)."""
    from mpi4py import MPI

    from mpipipe.parallel.transport import Transport

    comm = MPI.COMM_SELF.Dup()
    transport = Transport()
    buf = np.zeros(4, np.float32)
    recv = transport.link(comm).recv_init(buf, 0, 7)
    for step in (1, 2):
        recv.start()
        send = transport.isend(comm, np.full(4, step, np.float32), 0, 7)
        transport.wait(recv.request)
        transport.wait(send)
        assert buf.tolist() == [step] * 4
    assert len(transport.persistent) == 1
    transport.close()
    assert not transport.persistent
    comm.Free()


def test_waits_spin_long_only_where_every_rank_has_a_core():
    from mpipipe.parallel.transport import SPIN_OWN_CORE_S, SPIN_SHARED_S, spin_for

    assert spin_for(2, cores=2) == SPIN_OWN_CORE_S == 1e-3
    assert spin_for(4, cores=2) == SPIN_SHARED_S == 5e-5  # oversubscribed: yield the core


def test_a_large_message_does_not_wait_for_the_senders_next_action(tmp_path):
    """MPICH without its single-copy path (MPIR_CVAR_CH4_CMA_ENABLE=0) moves a message above
    its 8 KiB shared-memory cell only while the sender is inside MPI; the executor calls MPI
    between actions, so without transport's send helper every 64 KiB activation or gradient
    waited for the sender's whole next action (1F1B on 8 emulated ranks: 2.0x its simulated
    step). With the helper testing the send, the 2-rank pipeline keeps close to the simulation
    (1.02-1.04; without the helper 1.75, each hop costing a whole 40 ms action). MPICH only:
    Open MPI 4.1 without its single copy (btl_vader_single_copy_mechanism none) stalls the
    8-rank benchmark too (1F1B 1.81, 1.04 with the helper) but not this 2-rank run, so here the
    test could not fail."""
    if mpirun.launcher().family != launch.MPICH:
        pytest.skip(
            "MPIR_CVAR_CH4_CMA_ENABLE is MPICH's; under Open MPI this 2-rank run does not stall "
            "even without the send helper, so the test could not fail there"
        )
    single_copy_off = {"MPIR_CVAR_CH4_CMA_ENABLE": "0"}
    metrics = tmp_path / "m.jsonl"
    r = mpirun.train(
        2,
        "--layers", "2", "--pp", "2", "--microbatches", "4", "--global-batch", "4",
        "--steps", "3", "--emulate", "F=40,B=40,W=40", "--eval-batches", "1",
        "--metrics-file", str(metrics),
        timeout=120,
        **single_copy_off,
    )  # fmt: skip
    assert r.returncode == 0, r.output
    recs = [json.loads(line) for line in metrics.read_text().splitlines()][1:]
    ratio = min(x["pipeline_time_s"] / x["pipeline_time_predicted_s"] for x in recs)
    assert ratio < 1.4, ratio
