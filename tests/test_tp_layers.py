"""Tensor-parallel layers in one process: the ranks of a tp group are threads whose all-reduce
meets at a barrier, so a whole block's shards run as they would on tp ranks. Their outputs,
input gradients and joined weight gradients equal the single-rank layer's (itself checked
against finite differences in test_layers.py) to rounding, in float64; the block issues 2
all-reduces in forward and 2 in backward and none in its weight-gradient pass."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mpipipe.config import TrainConfig
from mpipipe.errors import ConfigError
from mpipipe.kernels.loss import cross_entropy_forward_backward
from mpipipe.layers import Block, Embedding, Head, Init
from mpipipe.parallel.tensor import Split
from mpipipe.stage import VocabParallelLoss
from tests.gradcheck import check_layer

B, T, C, H, V = 2, 5, 8, 4, 12


class Threads:
    """The shared state of a threaded tp group: one slot per rank, a barrier."""

    def __init__(self, size: int) -> None:
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size)


class ThreadGroup:
    """One rank of a threaded tp group; counts the collectives it takes part in."""

    def __init__(self, shared: Threads, rank: int) -> None:
        self.shared, self.size, self.rank, self.calls = shared, shared.size, rank, 0

    def _exchange(self, x: Any) -> list[Any]:
        """Every rank's `x`, in rank order."""
        self.calls += 1
        self.shared.slots[self.rank] = x.copy()
        self.shared.barrier.wait()
        parts = list(self.shared.slots)
        self.shared.barrier.wait()  # nobody overwrites a slot before all have read them
        return parts

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        parts = self._exchange(x)
        return np.maximum.reduce(parts) if op == "max" else sum(parts[1:], parts[0].copy())

    def all_gather(self, x: Any) -> Any:
        """Token blocks (B, S, C) joined in memory order: (B, tp S, C)."""
        flat = np.concatenate([p.reshape(-1) for p in self._exchange(x)])
        return flat.reshape(x.shape[0], x.shape[1] * self.size, *x.shape[2:])

    def reduce_scatter(self, x: Any) -> Any:
        """The sum, cut in memory order: my token block (B, T / tp, C)."""
        parts = self._exchange(x)
        total = sum(parts[1:], parts[0].copy())
        block = np.split(total.reshape(-1), self.size)[self.rank]
        return block.reshape(x.shape[0], x.shape[1] // self.size, *x.shape[2:]).copy()


def on_threads(tp: int, work: Callable[[ThreadGroup], Any]) -> list[Any]:
    """`work(group)` on tp threads, one per rank; their results in rank order."""
    shared, out, errors = Threads(tp), [None] * tp, []

    def run(r: int) -> None:
        try:
            out[r] = work(ThreadGroup(shared, r))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            shared.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def perturbed(layer: Any, tp: int, rank: int) -> Any:
    """Non-trivial parameters (LayerNorm g=1, biases 0 at start), the same whole tensors for
    every tp: drawn whole, then cut like the layer's own shards."""
    rng = np.random.default_rng(7)
    for name in sorted(layer.params):
        p = layer.params[name]
        split = layer.splits.get(name)
        whole_shape = p.shape if split is None else _whole_shape(p.shape, split, tp)
        noise = 0.3 * rng.normal(size=whole_shape)
        p += noise if split is None or tp == 1 else split.shard(noise, tp, rank)
    return layer


def _whole_shape(shape: tuple[int, ...], split: Split, tp: int) -> tuple[int, ...]:
    return tuple(n * tp if i == split.axis else n for i, n in enumerate(shape))


def run_layer(make: Callable[[Init], Any], x: np.ndarray, dy: np.ndarray, tp: int) -> dict:
    """Forward, backward_input and backward_weight of the layer `make` builds, on tp ranks;
    outputs and input gradients from rank 0, weight gradients joined, all-reduce counts."""

    def work(group: ThreadGroup) -> dict:
        layer = perturbed(make(Init.for_layer(3, 1, np.float64, np, group)), tp, group.rank)
        y, ctx = layer.forward(x)
        forward = group.calls
        dx, wctx = layer.backward_input(dy, ctx)
        backward = group.calls - forward
        layer.backward_weight(wctx)
        weight = group.calls - forward - backward
        return {"y": y, "dx": dx, "grads": layer.grads, "splits": layer.splits,
                "calls": (forward, backward, weight)}  # fmt: skip

    ranks = on_threads(tp, work)
    grads = {
        k: ranks[0]["splits"][k].join([r["grads"][k] for r in ranks])
        if k in ranks[0]["splits"] and tp > 1
        else ranks[0]["grads"][k]
        for k in ranks[0]["grads"]
    }
    return {**ranks[0], "grads": grads, "all": ranks}


def assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
    assert rel < 1e-12, f"{what}: relative difference {rel:.3g}"


def block(init: Init) -> Block:
    return Block(init, C, H, n_layer=2)


@pytest.mark.parametrize("tp", [2, 4])
def test_block_shards_equal_the_whole_block(tp):
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(B, T, C)), rng.normal(size=(B, T, C))
    ref, got = run_layer(block, x, dy, 1), run_layer(block, x, dy, tp)
    assert_close(got["y"], ref["y"], "output")
    assert_close(got["dx"], ref["dx"], "input gradient")
    for k in ref["grads"]:
        assert_close(got["grads"][k], ref["grads"][k], k)
    for r in got["all"][1:]:  # every rank of the group ends with the same activations
        np.testing.assert_array_equal(r["y"], got["y"])
    assert got["calls"] == (2, 2, 0)  # Megatron's f and g: 2 + 2, none in W


def test_block_with_one_rank_is_bitwise_the_old_block():
    """tp 1 takes no collective and computes exactly what the plain layers computed (kept by
    test_layers' finite-difference checks; here the column/row layers at tp 1 once more)."""
    x = np.random.default_rng(1).normal(size=(B, T, C))
    check_layer(perturbed(block(Init.for_layer(3, 1, np.float64, np)), 1, 0), x)


def test_vocabulary_parallel_embedding_head_and_loss():
    """Embedding (vocabulary rows), head (vocabulary columns) and the parallel cross-entropy
    (max and sums all-reduced, no rank holding (N, V) logits) against the whole ones."""
    rng = np.random.default_rng(2)
    tokens, targets = rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))
    dy = rng.normal(size=(B, T, C))

    def embed(init: Init) -> Embedding:
        return Embedding(init, V, C, T)

    ref, got = run_layer(embed, tokens, dy, 1), run_layer(embed, tokens, dy, 2)
    assert_close(got["y"], ref["y"], "embedding")
    for k in ref["grads"]:
        assert_close(got["grads"][k], ref["grads"][k], k)

    x = rng.normal(size=(B, T, C))

    def head_and_loss(tp: int) -> list[dict]:
        def work(group: Any) -> dict:
            init = Init.for_layer(3, 9, np.float64, np, group)
            head = perturbed(Head(init, C, V), tp, group.rank)
            logits, ctx = head.forward(x)
            if tp == 1:
                loss, dlogits = cross_entropy_forward_backward(logits, targets, 0.5)
            else:
                loss, dlogits = VocabParallelLoss(group, V).forward_backward(logits, targets, 0.5)
            dx, wctx = head.backward_input(dlogits, ctx)
            head.backward_weight(wctx)
            return {"loss": loss, "logits": logits, "dx": dx, "grads": head.grads,
                    "splits": head.splits}  # fmt: skip

        return on_threads(tp, work)

    (one,), two = head_and_loss(1), head_and_loss(2)
    assert two[0]["logits"].shape == (B, T, V // 2)  # no rank holds the whole logits
    for r in two:
        assert_close(np.asarray(r["loss"]), np.asarray(one["loss"]), "loss")
        assert_close(r["dx"], one["dx"], "head input gradient")
    w = two[0]["splits"]["lm_head.w"].join([r["grads"]["lm_head.w"] for r in two])
    assert_close(w, one["grads"]["lm_head.w"], "head weight gradient")


def test_split_round_trip_and_qkv_blocks():
    whole = np.arange(4 * 12).reshape(4, 12)
    qkv = Split(1, blocks=3)
    shards = [qkv.shard(whole, 2, r) for r in range(2)]
    np.testing.assert_array_equal(shards[0][:, :2], whole[:, :2])  # q's first heads
    np.testing.assert_array_equal(shards[0][:, 2:4], whole[:, 4:6])  # then k's
    np.testing.assert_array_equal(qkv.join(shards), whole)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tp": 3, "heads": 4}, "--tp 3 does not divide --heads 4"),
        ({"tp": 2, "model": "mlp"}, "--tp 2 needs a GPT model"),
        ({"tp": 4, "heads": 4, "vocab": 50257}, "pad it with --vocab 50432"),
        ({"tp": 0}, "--tp 0 must be at least 1"),
    ],
)
def test_tp_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_world_not_a_multiple_of_tp():
    cfg = TrainConfig(tp=2, heads=4)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of --tp 2"):
        cfg.layout(3, max_pp=4)
    assert (cfg.layout(8, max_pp=2).pp, cfg.layout(8, max_pp=2).dp) == (2, 2)


@pytest.mark.parametrize("tp", [2, 4])
def test_dry_run_estimate_counts_the_parameters_a_tp_rank_holds(tp):
    """memory.shard_params against the layers a tp rank builds (the dry run builds none)."""
    from mpipipe.memory import shard_params
    from mpipipe.model import gpt

    model = gpt(1, C, H, T, V)
    group = ThreadGroup(Threads(tp), 0)  # building a layer takes no collective
    for spec in model.layers:
        built = spec.build(Init.for_layer(3, 0, np.float64, np, group))
        held = sum(p.size for p in built.params.values())
        assert shard_params(spec.name, model.meta, spec.params, tp) == held, spec.name
        assert shard_params(spec.name, model.meta, spec.params, 1) == spec.params
