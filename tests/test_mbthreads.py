"""Micro-batches on a process's cores (mpipipe/mbthreads.py): one process holding the whole model
runs a micro-batch per thread at once, bitwise the serial run of the same row."""

from __future__ import annotations

import io
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mpipipe import TrainConfig, layers, mbthreads, rowwise, train
from mpipipe.kernels import accumulate

TINY = dict(layers=2, d_model=32, heads=2, seq_len=16, steps=2, eval_every=1, eval_batches=1)


def run(cfg: TrainConfig, threads: int) -> tuple[list[float], dict[str, np.ndarray], float]:
    """Losses (train and eval), final parameters and the most bytes of saved activations
    (MiB, the metrics' stash_mb) of `cfg` on `threads` cores."""
    with threadpool_limits(threads, user_api="blas"):  # the runtime takes its cores from this
        try:
            result = train(cfg, out=io.StringIO())
        finally:
            rowwise.use_threads(1)
    losses = [r[k] for r in result.history for k in ("loss", "eval_loss") if k in r]
    return losses, result.params, max(float(r["stash_mb"][0]) for r in result.history)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The user's OMP_NUM_THREADS (so the runtime keeps the BLAS's count); counts the runs of
    micro-batches on threads and the threads that ran them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen: dict[str, Any] = {"runs": 0, "threads": set()}
    real_run, real_mb = mbthreads.MicroBatchThreads.run, mbthreads.MicroBatchThreads._microbatch

    def counted_run(self: Any, batch: Any) -> Any:
        seen["runs"] += 1
        return real_run(self, batch)

    def counted_mb(self: Any, mb: int, lane: int) -> None:
        seen["threads"].add(threading.get_ident())
        if mb == 0:
            time.sleep(0.05)  # hold micro-batch 0 so that another thread takes micro-batch 1
        real_mb(self, mb, lane)

    monkeypatch.setattr(mbthreads.MicroBatchThreads, "run", counted_run)
    monkeypatch.setattr(mbthreads.MicroBatchThreads, "_microbatch", counted_mb)
    return seen


@pytest.mark.parametrize(
    "extra",
    [
        dict(global_batch=6, microbatches=3, optimizer="adamw"),  # an odd count: uneven turns
        dict(global_batch=8, microbatches=4, dtype="float64", tie_embeddings="yes",
             recompute="full"),  # a tied weight: head and embedding in one process
        dict(global_batch=4, microbatches=2, dtype="bf16", attention="tiled"),
    ],
    ids=["adamw-3", "float64-tied-full", "bf16-tiled"],
)  # fmt: skip
def test_threads_equal_the_serial_run_bitwise(
    counted: dict[str, Any], extra: Any, tmp_path: Path
) -> None:
    cfg = TrainConfig(**TINY, **extra)
    trace = tmp_path / "trace.json"
    threaded = run(cfg.replace(trace=str(trace), trace_steps=1), 3)
    assert counted["runs"] > 0 and len(counted["threads"]) > 1, counted  # it did run threaded
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "compute"]
    by_lane = {e["tid"] for e in spans if e["name"] != "optimizer"}
    assert len(by_lane) > 1  # the trace shows each worker's actions on a track of its own
    counted["runs"] = 0
    serial = run(cfg.replace(microbatch_threads="off"), 1)
    assert counted["runs"] == 0
    assert threaded[0] == serial[0]
    assert threaded[1].keys() == serial[1].keys()
    for name, p in serial[1].items():
        assert p.tobytes() == threaded[1][name].tobytes(), name
    # as many micro-batches' activations at once as threads, at the most (the row's peak: one)
    assert 0 < serial[2] < threaded[2] <= 3 * serial[2] + 1e-9, (serial[2], threaded[2])


def test_only_one_rank_with_several_cores_and_microbatches() -> None:
    assert mbthreads.applies(1, "numpy", False, 2, 2)
    assert not mbthreads.applies(2, "numpy", False, 2, 2)  # messages and collectives: ranks
    assert not mbthreads.applies(1, "cupy", False, 2, 2)
    assert not mbthreads.applies(1, "numpy", True, 2, 2)  # emulated compute sleeps
    assert not mbthreads.applies(1, "numpy", False, 1, 2)
    assert not mbthreads.applies(1, "numpy", False, 2, 1)


def test_layers_sharing_a_gradient_buffer_share_a_turnstile() -> None:
    a, b, c, d = (np.zeros(2) for _ in range(4))
    groups = mbthreads.share_groups({"x": [a], "y": [b, c], "z": [d, a], "w": [c], "v": []})
    assert groups == {"x": 0, "z": 0, "y": 1, "w": 1, "v": 2}


def test_turns_follow_their_numbers() -> None:
    gate, order = mbthreads.Turnstile(), []

    def take(n: int) -> None:
        time.sleep(random.random() * 0.01)
        gate.enter(n)
        order.append(n)
        gate.leave()

    threads = [threading.Thread(target=take, args=(n,)) for n in random.sample(range(8), 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == list(range(8))
    waiting = threading.Thread(target=lambda: pytest.raises(mbthreads._Broken, gate.enter, 99))
    waiting.start()
    gate.break_()  # a failed worker: nobody waits for a turn that will never come
    waiting.join(10)
    assert not waiting.is_alive()


@pytest.mark.timeout(60)
def test_a_failing_microbatch_raises_instead_of_hanging(
    counted: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = layers.Linear.backward_input

    def failing(self: Any, dy: Any, ctx: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # one micro-batch's backward, while the other waits for its turn
            raise FloatingPointError("injected failure")
        return original(self, dy, ctx)

    monkeypatch.setattr(layers.Linear, "backward_input", failing)
    with pytest.raises(FloatingPointError, match="injected failure"):
        run(TrainConfig(**TINY, global_batch=8, microbatches=4), 2)


def test_held_additions_wait_for_apply_in_their_order() -> None:
    dst = np.zeros(3)
    with accumulate.held() as adds:
        accumulate.add_into(dst, np.ones(3))
        accumulate.add_into(dst, np.full(3, 2.0))
        assert not dst.any()  # held back
    accumulate.add_into(dst, np.full(3, 10.0))  # outside held(): at once
    assert dst.tolist() == [10.0] * 3 and len(adds) == 2
    accumulate.apply(adds)
    assert dst.tolist() == [13.0] * 3


def test_builtin_layers_hold_their_additions_and_a_users_layer_does_not() -> None:
    init = layers.Init(np.random.default_rng(0), np.dtype(np.float64), np)
    block = layers.Block(init, 8, 2, 2)
    assert accumulate.holds_adds(block) and accumulate.holds_adds(layers.LayerNorm(init, 8))

    class Mine(layers.Linear):  # a user's W that adds its own way
        def backward_weight(self, wctx: Any) -> None:
            self.grads["w"] += 1.0

    mine = Mine(init, 8, 8)
    assert not accumulate.holds_adds(mine)
    assert not accumulate.holds_adds(layers.Sequential([("a", layers.GELU()), ("b", mine)]))
    assert not accumulate.holds_adds(layers.Embedding(init, 16, 8, 4))  # a scatter-add
