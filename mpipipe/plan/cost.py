"""Per-action costs and per-stage memory of one layout of a GPT, from a machine file.

Dimensions: b samples per micro-batch, T tokens per sample, C width, H heads, V vocabulary,
t tensor-parallel ranks; w bytes per element of the compute dtype.

    block F  matmul 24 bTC^2 (/t) + attention's 2 batched products; elementwise (mpipipe's
             kernels) 10 bTC whole (LayerNorms, residuals) + 24 bTC (/t: biases, GELU) + 4 bHT^2
             (/t: scale, mask, softmax) moved; Megatron's fused kernels move less (runtimes.py)
    block B  matmul 24 bTC^2 (/t) + attention's 4 batched products, twice F's elementwise traffic
    attention products  each 2 bT^2 C FLOPs (/t) and bHT^2 (/t: scores or probabilities, read
             or written) + 2 bTC (/t: Q, K, V, the context or their gradients) elements moved,
             priced by its own roofline: at head widths C/H of 64-160 the T x T result makes
             them memory-bound or nearly so, not at the large products' rate
    block W  matmul 24 bTC^2 (/t)
    head     F 2 bTCV (/t) + 4 bTV moved (mpipipe's loss), B and W 2 bTCV each
    dropout  (GPT.dropout, Megatron's default; mpipipe has none) F and B each move
             (2 + 1/w) bHT^2 (/t) on the attention probabilities and a 1-byte mask of bTC twice
A compute action costs matmul FLOPs / (peak x efficiency) + bytes moved / (memory bandwidth x
its achieved fraction) (a roofline summed over the action's kernels), plus the runtime's fixed
overhead per action. The pipeline message is mpipipe's (non-blocking: a latency between the
sender's action and the receiver's). With Layout.runtime = "megatron", Megatron-LM's of 2021:
- the message (megatron/p2p_communication.py): each tensor-parallel rank sends 1/t of the
  activation over the pipeline link and the receivers all-gather it over the tensor-parallel
  group (--scatter-gather-tensors-in-pipeline, on by default), and the exchange blocks the stage
  (batch_isend_irecv, wait, then torch.cuda.synchronize): every F that sends forward and every B
  that sends back holds its stage for the exchange;
- the gradient accumulation (megatron/model/distributed.py, the local DDP's param hook): each
  W's fresh 16-bit weight gradients are added into the contiguous gradient buffer,
  main_grad.add_(grad), reading both and writing one, 3 elements per parameter and micro-batch.
  PyTorch's DDP (overlap, Megatron's --DDP-impl torch) accumulates into .grad from the second
  micro-batch on: (m - 1) / m of that on average.
With tensor parallelism every block all-reduces b x T x C twice in F and twice in B (sequence
parallelism: two all-gathers and two reduce-scatters instead, the same bytes, and W gathers its
inputs again, as many bytes once more; the elementwise work and activations outside the matrix
products are split /t), the vocabulary-parallel embedding once in
F, the head's input gradient once in B, and the loss two float32 values per token in F. Each such
collective blocks ranks that compute: a calibrated machine adds a fixed time per collective and the
wait for the group's slowest member, growing as the square root of the compute since the last
collective (machine.py, `busy_collective_us` and `busy_jitter_us`).
Recompute full redoes the chunk's forward in B; selective redoes the attention scores. Emulated
compute (`--emulate F=,B=,W=` ms per layer and sample) replaces the roofline by those times, as
train does (no tensor-parallel all-reduces: emulated chunks only sleep).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any

from mpipipe.memory import (
    _WIDTH,
    activation_elements,
    bytes_per_param,
    loss_gradient_elements,
    shard_params,
)
from mpipipe.partition import uniform
from mpipipe.plan.machine import Link, Machine
from mpipipe.plan.runtimes import runtime


@dataclass(frozen=True)
class GPT:
    layers: int
    d_model: int
    heads: int
    seq_len: int
    vocab: int
    global_batch: int
    dtype: str = "float32"
    optimizer: str = "adamw"
    emulate: tuple[float, float, float] | None = None  # ms per body layer and sample
    # plan.profiled.Profile: the real layers' F/B/W timed here replace the roofline
    profile: Any = field(default=None, compare=False, hash=False, repr=False)
    dropout: bool = False  # dropout on the attention probabilities and both residual branches

    @property
    def meta(self) -> dict[str, object]:
        return {
            "kind": "gpt",
            "seq_len": self.seq_len,
            "d_model": self.d_model,
            "vocab": self.vocab,
            "n_head": self.heads,
            "n_layer": self.layers,
        }

    @property
    def width(self) -> int:
        return _WIDTH[{"fp32": "float32"}.get(self.dtype, self.dtype)]

    def layer_params(self, name: str) -> int:
        c, v, t = self.d_model, self.vocab, self.seq_len
        if name == "embed":
            return v * c + t * c
        if name == "head":
            return c * v + 2 * c
        return 12 * c * c + 13 * c

    @property
    def params(self) -> int:
        return sum(self.layer_params(n) for n in self.names)

    @cached_property
    def names(self) -> list[str]:
        return ["embed", *(f"block{i}" for i in range(self.layers)), "head"]

    def model_flops(self, samples: int) -> float:
        """Training FLOPs (6 per parameter per token + attention), as train's MFU counts them."""
        t = self.seq_len
        per_token = 6.0 * self.params + 12.0 * self.layers * t * self.d_model
        return per_token * samples * t


@dataclass(frozen=True)
class Layout:
    pp: int
    dp: int
    tp: int
    schedule: str
    v: int
    microbatches: int
    recompute: str = "none"
    zero: int = 0
    sp: bool = False
    overlap: bool = True  # gradient reduction during the backward pass (train's --overlap)
    runtime: str = "mpipipe"  # whose kernels and messages are priced, or "megatron" (runtimes.py)

    @property
    def ranks(self) -> int:
        return self.pp * self.dp * self.tp

    def micro_batch(self, model: GPT) -> int:
        return model.global_batch // (self.dp * self.microbatches)

    def label(self) -> str:
        v = f" v={self.v}" if self.v > 1 else ""
        extra = "".join(
            [
                f" rc={self.recompute}" if self.recompute != "none" else "",
                " zero1" if self.zero else "",
                " sp" if self.sp else "",
                "" if self.overlap else " no-overlap",
                "" if self.runtime == "mpipipe" else f" runtime={self.runtime}",
            ]
        )
        return (
            f"pp={self.pp} dp={self.dp} tp={self.tp} {self.schedule}{v} "
            f"m={self.microbatches}{extra}"
        )

    def with_(self, **kw: object) -> Layout:
        return replace(self, **kw)  # type: ignore[arg-type]


def allreduce_time(link: Link, nbytes: float, n: int) -> float:
    """Ring all-reduce (or reduce-scatter + all-gather) of `nbytes` over `n` ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * link.latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / (
        link.bandwidth_gbs * 1e9
    )


def bounds(model: GPT, layout: Layout) -> list[range]:
    """Global layers of each virtual stage, as train's uniform partition splits them."""
    return _bounds(model.layers, layout.pp * layout.v, layout.v)


@lru_cache(maxsize=1024)
def _bounds(layers: int, stages: int, chunks: int) -> list[range]:
    return uniform([False, *([True] * layers), False], stages, chunks)


@dataclass(frozen=True)
class StageCosts:
    f: list[float]  # seconds per virtual stage
    b: list[float]
    w: list[float]
    p2p: float  # one activation message between neighbouring pipeline ranks (its latency)
    exchange: float = 0.0  # a blocking exchange, inside each F and B that sends (megatron)


def action_costs(
    model: GPT, layout: Layout, machine: Machine, busy_ranks: float | None = None
) -> StageCosts:
    b, t, c, h, v = (
        layout.micro_batch(model),
        model.seq_len,
        model.d_model,
        model.heads,
        model.vocab,
    )
    tp, w = layout.tp, model.width
    mm = lambda flops: machine.matmul_time(flops / tp, model.dtype)  # noqa: E731
    mem = lambda elems: machine.memory_time(elems * w)  # noqa: E731
    rt = runtime(layout.runtime)  # its elementwise traffic (plan/runtimes.py)
    btc, scores = b * t * c / (tp if layout.sp else 1), b * h * t * t / tp
    drop_attn = drop_res = 0.0
    if model.dropout:  # F and B each: read, write and a 1-byte mask (written, then read)
        drop_attn = (2 + 1 / w) * b * h * t * t / tp
        drop_res = 2 * (1 / w) * b * t * c / (tp if layout.sp else 1)  # fused into the residual
    product = attention_product(model, b, tp, machine)
    attn_f = 2 * product + mem(rt.scores_f * scores + drop_attn)
    block_f = mm(24 * b * t * c * c) + attn_f + mem(rt.whole_f * btc + rt.split_f * b * t * c / tp)
    block_f += mem(drop_res)
    block_b = (
        mm(24 * b * t * c * c)
        + 4 * product
        + mem(rt.whole_b * btc + rt.split_b * b * t * c / tp + rt.scores_b * scores)
        + mem(drop_attn + drop_res)
    )
    block_w = mm(24 * b * t * c * c)
    block_f_roof = block_f
    # tensor-parallel ranks compute between blocking collectives: each collective costs the
    # links' alpha-beta plus, where calibrated, a fixed time (MPI's first call after compute)
    # and the wait for the group's slowest member, which grows as the square root of the
    # compute since the last collective (the ranks' jitter is a random walk), measured on 2
    # ranks and scaled to the expected slowest of tp
    busy = tp > 1 and not model.emulate
    ring = lambda nbytes: allreduce_time(machine.link(tp - 1), nbytes, tp)  # noqa: E731
    act = b * t * c * w  # one (B, T, C) activation's bytes

    def waits(*segments: float) -> float:
        """What collectives cost beyond the links, one after each of these stretches of
        compute (seconds) since the one before."""
        return sum(machine.busy_wait(x, tp) for x in segments) if busy else 0.0

    def evenly(compute: float, n: int) -> float:
        """waits() of n collectives spread evenly over `compute`."""
        return waits(*[compute / n] * n)

    def block_actions(forward: float, backward: float, weight: float) -> tuple[float, ...]:
        """A block's F, B and W with their collectives: 2 all-reduces in F and in B; with
        sequence parallelism 2 all-gathers and 2 reduce-scatters in each (the same bytes), and
        W gathers 4 activations again (parallel/sequence.py)."""
        if layout.sp:
            return (forward + 2 * ring(act) + evenly(forward, 4),
                    backward + 2 * ring(act) + evenly(backward, 4),
                    weight + 2 * ring(act) + evenly(weight, 4))  # fmt: skip
        return (
            forward + 2 * ring(act) + evenly(forward, 2),
            backward + 2 * ring(act) + evenly(backward, 2),
            weight,
        )

    block_f, block_b, block_w = block_actions(block_f, block_b, block_w)
    if layout.recompute == "full":
        block_b += block_f
    elif layout.recompute == "selective":
        block_b += attn_f
    embed = (mem(2 * b * t * c), 0.0)  # F, W (B: the first stage sends nothing back)
    if model.emulate:
        fe, be, we = (x * b / 1e3 for x in model.emulate)
        block_f, block_b, block_w = fe, be, we  # sleeps: no tensor-parallel all-reduce
        head = (0.0, 0.0, 0.0)
        embed = (0.0, 0.0)
    elif model.profile is not None:
        prof = model.profile.times(b, tp)
        block_f, block_b, block_w = block_actions(*prof["block"])
        if layout.recompute == "full":
            block_b += block_f
        elif layout.recompute == "selective":  # the attention core: about its share of F
            block_b += prof["block"][0] * attn_f / max(block_f_roof, 1e-30)
        head = prof["head"]
        embed = (prof["embed"][0], prof["embed"][2])
    else:
        head = (
            mm(2 * b * t * c * v) + mem(rt.logits_f * b * t * v / tp),
            mm(2 * b * t * c * v) + mem(rt.logits_b * b * t * v / tp),
            mm(2 * b * t * c * v),
        )
    if not model.emulate:  # the vocabulary-parallel ends' collectives (parallel/tensor.py)
        # the embedding's sum over vocabulary shards (sp: reduce-scattered, and W gathers the
        # gradient again); the loss's max then sum per token, after the head's product (sp:
        # the head first gathers its input); the head's input gradient (sp: reduce-scattered,
        # and W gathers the input again)
        half = ring(act) / 2  # an all-gather or a reduce-scatter: half a ring all-reduce
        if layout.sp:
            embed = (embed[0] + half + waits(embed[0]), embed[1] + half + waits(embed[1]))
            loss = half + 2 * ring(b * t * 4) + waits(0.0, head[0], 0.0)
            head = (head[0] + loss, head[1] + half + waits(head[1]),
                    head[2] + half + waits(head[2]))  # fmt: skip
        else:
            embed = (embed[0] + ring(act) + waits(embed[0]), embed[1])
            loss = 2 * ring(b * t * 4) + waits(head[0], 0.0)  # float32 per token
            head = (head[0] + loss, head[1] + ring(act) + waits(head[1]), head[2])
    over = machine.action_overhead(layout.ranks, busy_ranks)  # see predict.busy_ranks
    p2p, exchange = pipeline_message(model, layout, machine)
    accumulate = accumulation_time(model, layout, machine)  # per parameter of the chunk
    shards = {n: shard_params(n, model.meta, model.layer_params(n), tp) for n in model.names}
    f, bb, ww = [], [], []
    names, parts = model.names, bounds(model, layout)
    for k, r in enumerate(parts):
        n = sum(1 for i in r if names[i].startswith("block"))
        has_head, has_embed = names[r[-1]] == "head", names[r[0]] == "embed"
        sends_f, sends_b = k < len(parts) - 1, k > 0  # blocking exchanges (megatron)
        f.append(over + n * block_f + has_head * head[0] + has_embed * embed[0]
                 + sends_f * exchange)  # fmt: skip
        bb.append(over + n * block_b + has_head * head[1] + sends_b * exchange)
        ww.append(over + n * block_w + has_head * head[2] + has_embed * embed[1]
                  + accumulate * sum(shards[names[i]] for i in r))  # fmt: skip
    return StageCosts(f, bb, ww, p2p, exchange)


def attention_product(model: GPT, b: int, tp: int, machine: Machine) -> float:
    """One of attention's batched products on one rank, by its own roofline: 2 bT^2 C / t FLOPs
    (per head a (T x d)(d x T) or (T x T)(T x d) product, d = C / H) against its bytes, the
    heads' T x T scores or probabilities (read or written) and two T x d operands or results
    per head. Q K^T reads Q and K and writes the scores; P V reads P and V and writes the
    context; B's four (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) move the same."""
    t, c, h = model.seq_len, model.d_model, model.heads
    flops = 2 * b * t * t * c / tp
    elems = b * h * t * t / tp + 2 * b * t * c / tp
    return machine.product_time(flops, elems * model.width, model.dtype)


def accumulation_time(model: GPT, layout: Layout, machine: Machine) -> float:
    """Seconds per parameter a W spends adding its weight gradients into the accumulation buffer:
    0 for mpipipe (priced with the matrix products), 3 16-bit elements moved for Megatron's
    local DDP, (m - 1) / m of that for PyTorch's (see the module's docstring)."""
    rt = runtime(layout.runtime)
    if not rt.accumulate or model.emulate or model.profile is not None:
        return 0.0
    share = 1.0 if not layout.overlap else (layout.microbatches - 1) / layout.microbatches
    return share * machine.memory_time(rt.accumulate * model.width)


def pipeline_message(model: GPT, layout: Layout, machine: Machine) -> tuple[float, float]:
    """(latency, blocking exchange) of one activation message between pipeline neighbours,
    tp x dp ranks apart: mpipipe's is a latency on the link; Megatron's (Layout.runtime) 1/t of
    it on that link then an all-gather over the tensor-parallel group, held by both stages."""
    if layout.pp == 1:
        return 0.0, 0.0
    tp = layout.tp
    msg = layout.micro_batch(model) * model.seq_len * model.d_model * model.width
    link = machine.link(tp * layout.dp)
    if runtime(layout.runtime).blocking_p2p:
        gather = allreduce_time(machine.link(tp - 1), msg, tp) / 2  # half of a ring all-reduce
        return 0.0, link.time(msg / tp) + gather
    return link.time(msg / (tp if layout.sp else 1)), 0.0


@dataclass(frozen=True)
class StageMemory:
    params: int
    weights: float  # bytes: parameters, gradients, optimizer state
    stash: float  # bytes: saved activations at the schedule's peak
    buffers: float  # bytes: message buffers and reduction copies

    @property
    def total(self) -> float:
        return self.weights + self.stash + self.buffers


def stage_params(model: GPT, layout: Layout, chunks: tuple[int, ...]) -> int:
    parts, names = bounds(model, layout), model.names
    kinds = {
        n: shard_params(n, model.meta, model.layer_params(n), layout.tp)
        for n in ("embed", "block0", "head")
    }
    return sum(
        kinds["block0" if names[i].startswith("block") else names[i]]
        for k in chunks
        for i in parts[k]
    )


def memory(model: GPT, layout: Layout, chunks: tuple[int, ...], peak_stash: int) -> StageMemory:
    """One rank's memory: `chunks` are its virtual stages, `peak_stash` the schedule's peak
    number of stashed chunk activations on it (the checker's count)."""
    params = stage_params(model, layout, chunks)
    per: float
    dtype = {"fp32": "float32"}.get(model.dtype, model.dtype)
    per = bytes_per_param(dtype, model.optimizer)
    w = model.width
    if layout.zero:  # optimizer state (and fp32 masters) sharded over the replicas
        slots = {"adamw": 2, "sgd": 1}[model.optimizer]
        state = 4 * (1 + slots) if w == 2 else w * slots
        per = per - state + state / layout.dp
    parts, names = bounds(model, layout), model.names
    b = layout.micro_batch(model)
    t, c = model.seq_len, model.d_model

    def act(name: str) -> float:
        e: float = activation_elements(name, model.meta, b, layout.tp, layout.sp)
        if name.startswith("block"):
            if layout.recompute == "selective":
                e -= b * model.heads * t * t // layout.tp
        return e

    kinds = {n: act(n) for n in ("embed", "block0", "head")}

    def chunk_act(k: int, full: bool = False) -> float:
        if layout.recompute == "full" and not full:  # the chunk's input only
            return b * t * c
        named = [names[i] for i in parts[k]]
        loss = loss_gradient_elements(model.meta, b, layout.tp) if "head" in named else 0
        return loss + sum(kinds["block0" if n.startswith("block") else n] for n in named)

    acts = [chunk_act(k) for k in chunks]
    stash = peak_stash * max(acts) * w
    if layout.recompute == "full":
        stash += max(chunk_act(k, full=True) for k in chunks) * w  # one chunk in backward
    buffers = 4 * len(chunks) * b * t * c * w / (layout.tp if layout.sp else 1)
    if w == 2 and layout.dp > 1:
        buffers += params * 4  # float32 copies of the 16-bit gradient buckets
    if any(names[parts[k][-1]] == "head" for k in chunks):  # the loss's logits, probabilities
        buffers += 2 * b * t * model.vocab / layout.tp * w
    return StageMemory(params, params * per, stash, buffers)
