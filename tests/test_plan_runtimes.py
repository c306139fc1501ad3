"""The planner's runtime-specific and machine-specific terms (pure Python): attention's batched
products by their own roofline, the achieved memory bandwidth, NIC-parallel collectives across
nodes, and what Megatron-LM's runtime does differently from mpipipe's (plan/runtimes.py)."""

from __future__ import annotations

import dataclasses

import pytest
import tomllib

from mpipipe.errors import ConfigError
from mpipipe.memory import shard_params
from mpipipe.plan.cost import GPT, Layout, action_costs, allreduce_time, attention_product
from mpipipe.plan.machine import Link, Machine, from_mapping, load
from mpipipe.plan.predict import predict
from mpipipe.plan.runtimes import RUNTIMES, Runtime

SMALL = dict(layers=4, d_model=64, heads=4, seq_len=32, vocab=128, global_batch=16)


def machine(**kw: object) -> Machine:
    """1 TFLOP/s, 1 GB/s of memory, distinct links: every term is visible."""
    base = Machine("t", 8, 64.0, 1.0, {"float32": 1.0}, 1.0, Link(2.0, 1.0), Link(0.5, 4.0))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_attention_products_take_the_longer_of_their_flops_and_their_bytes() -> None:
    model, b, tp = GPT(**SMALL), 2, 2
    t, c, h, w = 32, 64, 4, 4
    flops, nbytes = 2 * b * t * t * c / tp, (b * h * t * t / tp + 2 * b * t * c / tp) * w
    fast_memory = machine(memory_bandwidth_gbs=1e9)
    assert attention_product(model, b, tp, fast_memory) == pytest.approx(flops / 1e12)
    slow = machine(flops={"float32": 1e6}, memory_efficiency=0.5)
    assert attention_product(model, b, tp, slow) == pytest.approx(nbytes / 0.5e9)


def test_new_machine_keys_default_to_the_old_prices_and_round_trip() -> None:
    old = load("selene-a100").to_toml()
    for key in ("memory_efficiency = 0.88\n", "nics_per_node = 8\n"):
        old = old.replace(key, "")
    m = from_mapping(tomllib.loads(old), "t")
    assert (m.memory_efficiency, m.nics_per_node) == (1.0, 0)
    assert m.memory_time(2e9) == pytest.approx(2e9 / (m.memory_bandwidth_gbs * 1e9))
    assert m.collective_link(8, 32) == m.inter  # one port: the inter-node link as before
    selene = load("selene-a100")
    assert from_mapping(tomllib.loads(selene.to_toml()), "t") == selene
    with pytest.raises(ConfigError, match="memory_efficiency"):
        from_mapping(tomllib.loads(selene.to_toml().replace("= 0.88", "= 1.5")), "t")


def test_collectives_across_nodes_use_a_port_per_member_up_to_the_node_link() -> None:
    m = machine(nics_per_node=8)  # intra 2 GB/s, inter 0.5 GB/s, 8 devices per node
    assert m.collective_link(1, 8) == m.intra  # one node
    assert m.collective_link(8, 4).bandwidth_gbs == 0.5  # one member per node: one port
    assert m.collective_link(2, 16).bandwidth_gbs == 2.0  # 4 members: 4 x 0.5, the node's cap
    assert m.collective_link(4, 8).bandwidth_gbs == 1.0  # 2 members per node
    assert machine(nics_per_node=1).collective_link(2, 16).bandwidth_gbs == 0.5


def test_megatron_runtime_blocks_on_a_scattered_exchange_and_accumulates_gradients() -> None:
    """Against mpipipe's runtime on the same layout: F of every virtual stage but the last and
    B of every one but the first hold the exchange (1/tp of the message on the pipeline link,
    then an all-gather over tp); W adds 3 elements per parameter (local DDP, every micro-batch);
    the message is no longer a latency."""
    model, m = GPT(**SMALL), machine()
    lay = Layout(2, 1, 2, "interleaved", 2, 4, overlap=False)
    ours, theirs = (
        action_costs(model, lay, m),
        action_costs(model, lay.with_(runtime="megatron"), m),
    )
    msg = 4 * 32 * 64 * 4  # b x T x C float32 (b = 4), to a neighbour 2 ranks apart: in a node
    exchange = m.intra.time(msg / 2) + allreduce_time(m.intra, msg, 2) / 2
    assert (theirs.p2p, theirs.exchange) == (0.0, pytest.approx(exchange))
    assert ours.p2p == pytest.approx(m.intra.time(msg)) and ours.exchange == 0.0
    mpi, meg = RUNTIMES["mpipipe"], RUNTIMES["megatron"]
    btc, scores = 4 * 32 * 64, 4 * 4 * 32 * 32 / 2  # b x T x C; b x H x T^2 / tp

    def kernels(rt: Runtime, f: bool) -> float:  # elementwise seconds of one block (1 GB/s)
        whole, split, att = (rt.whole_f, rt.split_f, rt.scores_f) if f else (
            rt.whole_b, rt.split_b, rt.scores_b)  # fmt: skip
        return (whole * btc + split * btc / 2 + att * scores) * 4 / 1e9

    extra_f, extra_b = (kernels(meg, f) - kernels(mpi, f) for f in (True, False))
    assert len(theirs.f) == 4  # one block per virtual stage, the embedding on 0, the head on 3
    logits = 4 * 32 * 128 / 2 * 4 / 1e9  # the loss's b x T x V / tp, float32, at 1 GB/s
    loss_f, loss_b = ((x - y) * logits for x, y in ((19, 4), (7, 4)))  # runtimes.py's counts
    for k in range(4):  # F sends but from the last, B but from the first; the head on 3
        f_extra = extra_f + (k < 3) * exchange + (k == 3) * loss_f
        b_extra = extra_b + (k > 0) * exchange + (k == 3) * loss_b
        assert theirs.f[k] - ours.f[k] == pytest.approx(f_extra)
        assert theirs.b[k] - ours.b[k] == pytest.approx(b_extra)
    per_block = shard_params("block0", model.meta, model.layer_params("block0"), 2)
    assert theirs.w[1] - ours.w[1] == pytest.approx(per_block * 3 * 4 / 1e9)


def test_megatron_reduces_16_bit_gradients_and_pytorch_ddp_skips_the_first_accumulation() -> None:
    model = GPT(**{**SMALL, "dtype": "fp16"})
    m = machine(flops={"fp16": 1.0})
    lay = Layout(1, 4, 1, "1f1b", 1, 4, overlap=False)
    ours = predict(model, lay, m)
    theirs = predict(model, lay.with_(runtime="megatron"), m)
    assert theirs.breakdown["dp reduce (not hidden)"] < ours.breakdown["dp reduce (not hidden)"]
    assert theirs.breakdown["optimizer"] == pytest.approx(ours.breakdown["optimizer"] * 54 / 32)
    local = action_costs(model, lay.with_(runtime="megatron"), m).w
    torch = action_costs(model, lay.with_(runtime="megatron", overlap=True), m).w
    plain = action_costs(model, lay, m).w
    assert [t - p for t, p in zip(torch, plain, strict=True)] == pytest.approx(
        [(x - p) * 3 / 4 for x, p in zip(local, plain, strict=True)]
    )


def test_tensor_parallel_ends_pay_their_all_reduces() -> None:
    """Beyond the blocks' two all-reduces in F and two in B: the vocabulary-parallel embedding's
    output in F, the loss's two float32 values per token in F, the head's input gradient in B."""
    model, lay = GPT(**SMALL), Layout(1, 1, 2, "1f1b", 1, 4)
    free = machine(intra=Link(1e12, 0.0))
    paid, none = action_costs(model, lay, machine()), action_costs(model, lay, free)
    btc = allreduce_time(machine().intra, 4 * 32 * 64 * 4, 2)  # b = 4, float32
    per_token = allreduce_time(machine().intra, 4 * 32 * 4, 2)
    assert paid.f[0] - none.f[0] == pytest.approx(4 * 2 * btc + btc + 2 * per_token, rel=1e-6)
    assert paid.b[0] - none.b[0] == pytest.approx(4 * 2 * btc + btc, rel=1e-6)


def test_recomputed_flops_are_the_papers_formula() -> None:
    """At 1 FLOP/s and free memory and links, a step with full recomputation costs Megatron
    SC21's FLOPs per iteration, 96 B s l h^2 (1 + s / 6h + V / 16 l h), its equation 3."""
    from mpipipe.plan.megatron import paper_flops

    model = GPT(**SMALL)
    free = machine(memory_bandwidth_gbs=1e30, flops={"float32": 1e-12},
                   intra=Link(1e30, 0.0), inter=Link(1e30, 0.0))  # fmt: skip
    lay = Layout(2, 1, 1, "1f1b", 1, 4, "full")
    c = action_costs(model, lay, free)
    total = (sum(c.f) + sum(c.b) + sum(c.w)) * lay.microbatches
    assert total == pytest.approx(paper_flops(16, 32, 4, 64, 128), rel=1e-9)


def test_megatron_gradients_are_final_across_its_one_backward_pass() -> None:
    """PyTorch's DDP overlaps the reduction with the whole backward (B and W, one autograd pass):
    more of it hides than behind mpipipe's W alone. Emulated float32 on pp = 1: nothing else in
    the two runtimes' prices differs."""
    model = GPT(**SMALL, emulate=(1.0, 1.0, 1.0))
    slow = machine(intra=Link(0.01, 5.0))  # 10 MB/s: the reduction outlasts the backward
    lay = Layout(1, 2, 1, "1f1b", 1, 2, overlap=True)
    ours = predict(model, lay, slow, bucket_mb=0.001)
    theirs = predict(model, lay.with_(runtime="megatron"), slow, bucket_mb=0.001)
    assert ours.breakdown["pipeline"] == theirs.breakdown["pipeline"]
    tail = "dp reduce (not hidden)"
    assert 0 < theirs.breakdown[tail] < ours.breakdown[tail]


def test_megatron_all_reduces_the_tied_embeddings_between_first_and_last_stage() -> None:
    """After the data-parallel reduction the first and last pipeline stages all-reduce the word
    embeddings' gradient, V x C / t elements (megatron/training.py); mpipipe's GPT ties none."""
    model, m = GPT(**SMALL), machine()
    lay = Layout(2, 1, 1, "1f1b", 1, 4, runtime="megatron")  # dp = 1: nothing else to reduce

    def tail(layout: Layout) -> float:
        return predict(model, layout, m).breakdown["dp reduce (not hidden)"]

    assert tail(lay) == pytest.approx(allreduce_time(m.intra, 128 * 64 * 4, 2))
    assert tail(lay.with_(runtime="mpipipe")) == tail(lay.with_(pp=1, microbatches=8)) == 0
