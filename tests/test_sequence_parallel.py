"""Sequence parallelism in one process, on the threaded tp groups of test_tp_layers.py: each
rank feeds its block of the sequence; the joined blocks of the outputs and input gradients and
the weight gradients (split ones joined, the LayerNorms' partial sums added over the group as
parallel/sequence.py does) equal the single-rank layer's to 1e-12 relative in float64 (sums
over the group run in another order: not bitwise). Also the collectives each action kind
holds (what schedule/collectives.py declares), the bytes a forward saves (against memory.py),
the order check of collective-holding actions, and the config errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError, ScheduleError
from mpipipe.executor import _nbytes
from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.layers import Block, Embedding, Head, Init
from mpipipe.memory import activation_elements
from mpipipe.model import gpt
from mpipipe.schedule import SCHEDULES, build, collectives
from mpipipe.schedule.actions import B, F, W
from mpipipe.stage import VocabParallelLoss
from tests.test_tp_layers import ThreadGroup, Threads, assert_close, on_threads, perturbed

Bt, T, C, H, V = 2, 8, 8, 4, 12  # T: a multiple of every tp tested


def block(init: Init) -> Block:
    return Block(init, C, H, n_layer=2)


def mine(a: np.ndarray, group: Any) -> np.ndarray:
    """My token block: block `rank` of the B x T rows in memory order, as (B, T / tp, C)."""
    b, t, c = a.shape
    return np.split(a.reshape(b * t, c), group.size)[group.rank].reshape(b, t // group.size, c)


def join(blocks: list[np.ndarray]) -> np.ndarray:
    """The whole (B, T, C) from every rank's token block, in rank order."""
    b, s, c = blocks[0].shape
    return np.concatenate([x.reshape(b * s, c) for x in blocks]).reshape(b, s * len(blocks), c)


def run(make: Callable[[Init], Any], x: Any, dy: np.ndarray, tp: int, tokens: bool = False):
    """F, B and W of the layer `make` builds on tp threads with sequence parallelism (tp 1:
    the plain layer): per rank its outputs, input gradient, gradients, collectives per action."""

    def work(group: Any) -> dict:
        init = Init.for_layer(3, 1, np.float64, np, group, sequence=True)
        layer = perturbed(make(init), tp, group.rank)
        y, ctx = layer.forward(x if tokens else mine(x, group))
        f = group.calls
        dx, wctx = layer.backward_input(mine(dy, group), ctx)
        b = group.calls - f
        layer.backward_weight(wctx)
        return {"y": y, "dx": dx, "grads": layer.grads, "splits": layer.splits,
                "partial": layer.partial, "calls": (f, b, group.calls - f - b)}  # fmt: skip

    return on_threads(tp, work)


def joined(ranks: list[dict]) -> dict[str, np.ndarray]:
    """The whole gradients: split ones joined, partial ones summed, replicated ones equal."""
    out, first = {}, ranks[0]
    for k, g in first["grads"].items():
        if k in first["splits"] and len(ranks) > 1:
            out[k] = first["splits"][k].join([r["grads"][k] for r in ranks])
        elif k in first["partial"]:
            out[k] = sum(r["grads"][k] for r in ranks)
        else:
            for r in ranks[1:]:  # replicated, from whole inputs: the same on every rank
                np.testing.assert_array_equal(r["grads"][k], g, err_msg=k)
            out[k] = g
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_block_equals_the_whole_block_to_1e12(tp):
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(Bt, T, C)), rng.normal(size=(Bt, T, C))
    (ref,), got = run(block, x, dy, 1), run(block, x, dy, tp)
    assert got[0]["y"].shape == (Bt, T // tp, C)  # the residual stream: my block
    assert_close(join([r["y"] for r in got]), ref["y"], "output")
    assert_close(join([r["dx"] for r in got]), ref["dx"], "input gradient")
    want, have = joined([ref]), joined(got)
    assert sorted(got[0]["partial"]) == ["attn.ln.b", "attn.ln.g", "mlp.ln.b", "mlp.ln.g"]
    for k in want:
        assert_close(have[k], want[k], k)
    # 2 all-gathers + 2 reduce-scatters in F and in B; W gathers the 2 column-layer inputs and
    # the 2 row-layer output gradients again: W holds collectives, as the checker is told
    assert got[0]["calls"] == (4, 4, 4)
    assert collectives.holding(tp, sequence_parallel=True) == {"F", "B", "W"}
    assert collectives.holding(tp, sequence_parallel=False) == {"F", "B"}  # W: (2, 2, 0)
    assert collectives.holding(1, sequence_parallel=True) == set()


def test_sequence_parallel_embedding_head_and_loss_to_1e12():
    """The embedding reduce-scatters (my block plus its positions' embeddings); the head gathers
    the whole sequence for the vocabulary-parallel loss, which thus equals the plain one."""
    tp, rng = 2, np.random.default_rng(2)
    tokens, targets = rng.integers(0, V, size=(Bt, T)), rng.integers(0, V, size=(Bt, T))
    dy = rng.normal(size=(Bt, T, C))

    def embed(init: Init) -> Embedding:
        return Embedding(init, V, C, T)

    (ref,), got = run(embed, tokens, dy, 1, tokens=True), run(embed, tokens, dy, tp, tokens=True)
    assert_close(join([r["y"] for r in got]), ref["y"], "embedding")
    want, have = joined([ref]), joined(got)
    for k in want:
        assert_close(have[k], want[k], k)
    assert got[0]["calls"] == (1, 0, 1)  # W gathers the output gradient (my vocabulary rows)

    x = rng.normal(size=(Bt, T, C))

    def head_and_loss(group: Any) -> dict:
        init = Init.for_layer(3, 9, np.float64, np, group, sequence=True)
        head = perturbed(Head(init, C, V), group.size, group.rank)
        logits, ctx = head.forward(mine(x, group))
        if group.size == 1:
            loss, dlogits = cross_entropy_forward_backward(logits, targets, 0.5)
        else:
            loss, dlogits = VocabParallelLoss(group, V).forward_backward(logits, targets, 0.5)
        dx, wctx = head.backward_input(dlogits, ctx)
        head.backward_weight(wctx)
        return {"loss": loss, "dx": dx, "grads": head.grads, "splits": head.splits,
                "partial": head.partial, "shape": logits.shape}  # fmt: skip

    (one,), two = on_threads(1, head_and_loss), on_threads(tp, head_and_loss)
    assert two[0]["shape"] == (Bt, T, V // tp)  # the whole sequence, my vocabulary columns
    for r in two:
        assert_close(np.asarray(r["loss"]), np.asarray(one["loss"]), "loss")
    assert_close(join([r["dx"] for r in two]), one["dx"], "head input grad")
    want, have = joined([one]), joined(two)
    for k in want:
        assert_close(have[k], want[k], k)


@pytest.mark.parametrize("tp", [2, 4])
def test_saved_activation_bytes_scale_as_one_over_tp_and_match_memory_py(tp):
    """The bytes a GPT's forward saves for one micro-batch (every layer's context, measured as
    the executor does), with sequence parallelism at tp, are 1/tp of tp 1's, and what memory.py
    predicts, within 10%."""
    model = gpt(2, C, H, T, V)

    def saved(group: Any) -> int:
        x: Any = np.random.default_rng(4).integers(0, V, size=(Bt, T))
        total = 0
        for i, spec in enumerate(model.layers):
            layer = spec.build(Init.for_layer(3, i, np.float64, np, group, sequence=True))
            x, ctx = layer.forward(x)
            total += _nbytes(ctx)
        return total

    one, got = saved(ThreadGroup(Threads(1), 0)), on_threads(tp, saved)
    predicted = 8 * sum(
        activation_elements(s.name, model.meta, Bt, tp, sp=True) for s in model.layers
    )
    for measured in got:
        assert abs(measured * tp / one - 1) < 0.1, (measured, one)
        assert abs(measured / predicted - 1) < 0.1, (measured, predicted)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("sp", [False, True])
def test_every_built_in_schedule_runs_collectives_in_one_order(name, sp):
    v = 2 if name in ("interleaved", "zbv") else None
    plan = build(name, 2, 4, v)
    collectives.check(collectives.rows(plan, 4), collectives.holding(4, sp))


def test_a_tp_group_whose_ranks_order_collectives_differently_is_rejected():
    """A hand-written row map where tp rank 1 of pipeline rank 0 runs two forwards swapped (its
    collectives would pair micro-batch 0's with 1's), and one where it swaps two W's: harmless
    without sequence parallelism (W is local), rejected with it (W gathers)."""
    row = [F(0), F(1), B(0), W(0), B(1), W(1)]
    swapped_f = [F(1), F(0), B(0), W(0), B(1), W(1)]
    with pytest.raises(ScheduleError, match=r"pipeline rank 0: tp ranks 0 and 1 .* #0 is F0 on "
                       r"tp rank 0 but F1 on tp rank 1"):  # fmt: skip
        collectives.check({(0, 0): row, (0, 1): swapped_f}, collectives.holding(2))
    swapped_w = [F(0), F(1), B(0), B(1), W(1), W(0)]
    rows = {(0, 0): [F(0), F(1), B(0), B(1), W(0), W(1)], (0, 1): swapped_w}
    collectives.check(rows, collectives.holding(2, sequence_parallel=False))
    with pytest.raises(ScheduleError, match=r"#4 is W0 on tp rank 0 but W1 on tp rank 1"):
        collectives.check(rows, collectives.holding(2, sequence_parallel=True))
    short = {(0, 0): row, (0, 1): row[:-1]}
    with pytest.raises(ScheduleError, match=r"#5 is W1 on tp rank 0 but nothing on tp rank 1"):
        collectives.check(short, collectives.holding(2, sequence_parallel=True))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sequence_parallel": True}, "--sequence-parallel needs --tp 2 or more"),
        (
            {"tp": 2, "heads": 4, "seq_len": 15, "sequence_parallel": True},
            "--tp 2 does not divide --seq-len 15",
        ),
    ],
)
def test_sequence_parallel_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_default_layout_on_16_ranks_is_unchanged_without_tp():
    """`mpirun -n 16 python -m mpipipe train` (4 layers): pp 4 x dp 4 with tp 1, as before."""
    cfg = TrainConfig().validate().layout(16, max_pp=4)
    assert (cfg.pp, cfg.dp, cfg.tp, cfg.sequence_parallel) == (4, 4, 1, False)


def test_dry_run_memory_knows_sequence_parallelism():
    """--dry-run's table (memory.per_rank) with --sequence-parallel: the same weights, a smaller
    stash (the LayerNorms' and column-layer inputs' 4 bTC + 2 bT per block now split too)."""
    from mpipipe.job import prepare
    from mpipipe.memory import per_rank, table

    cfg = TrainConfig(tp=2, pp=2, layers=2, d_model=32, heads=4, seq_len=16, global_batch=8)
    plain, sp = (
        per_rank(prepare(cfg, 4)),
        per_rank(prepare(cfg.replace(sequence_parallel=True), 4)),
    )
    for a, b in zip(plain, sp, strict=True):
        assert a.weights_bytes == b.weights_bytes and b.stash_bytes < a.stash_bytes
    assert "2 tensor-parallel ranks (sequence parallel)" in table(sp, 2, True)
