"""Memory per pipeline rank, estimated from the config alone (the dry run builds no model).

    weights   parameters, gradients and optimizer state: bytes per parameter by dtype and
              optimizer (fp16/bf16 add fp32 master weights and fp32 gradients); with --zero 1
              the optimizer state, masters and fp32 gradients are 1/dp of that per replica
    stash     saved activations at the schedule's peak stash (the checker's count), per
              micro-batch b x T x C (H heads, vocabulary V), what the layers' contexts hold:
                block  20 bTC + 2 bT + b H T^2 elements: at the two LayerNorms and the inputs
                       of qkv and fc 4 bTC + 2 bT (normalised rows, 1/std), after them 16 bTC
                       + b H T^2 (q, k, v, the attention probabilities, the proj input, GELU's
                       input and tanh, the second proj's input; no dropout); with
                       --attention tiled b H T (a logsumexp per row) instead of b H T^2
                head   2 bTC + bT (the final LayerNorm and the LM head's input), plus on the
                       last stage the loss gradient bTV, which waits from F to B
With tensor parallelism (tp) a rank holds 1/tp of each split tensor (qkv, fc and their biases,
the proj weights, the token embedding, the LM head) and whole copies of the rest (LayerNorms,
the row-parallel biases, the position embedding); of a block's saved activations the 16 bTC +
b H T^2 after the column-parallel products are split, the 4 bTC + 2 bT at the LayerNorms whole;
the loss gradient is split (my vocabulary columns). With sequence parallelism (`sp`) the
LayerNorms and the column-parallel layers save their token block (1/tp of the rows): every saved
activation of a block and of the head is split (1/tp), the embedding's token ids are not.
The estimate leaves out receive buffers and transient workspaces; `stash_mb` and `max_rss_mb`
in the metrics file are the measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_WIDTH = {"float32": 4, "float64": 8, "fp16": 2, "bf16": 2}
_SLOTS = {"adamw": 2, "sgd": 1}


def bytes_per_param(dtype: str, optimizer: str, shards: int = 1) -> float:
    """Parameter + gradient + optimizer state bytes for one parameter; the optimizer's part
    (its slots, and fp32 masters and gradients) held by one of `shards` replicas (ZeRO-1)."""
    w, slots = _WIDTH[dtype], _SLOTS[optimizer]
    if w == 2:  # fp32 masters, fp32 gradients and fp32 slots beside the 16-bit copies
        return 2 * w + 4 * (2 + slots) / shards
    return w * 2 + w * slots / shards


def shard_params(name: str, meta: dict[str, Any], params: int, tp: int = 1) -> int:
    """Parameters of one GPT layer held by one of `tp` ranks (`params`: the whole layer's)."""
    if tp == 1 or meta.get("kind") != "gpt":
        return params
    t, c, v = meta["seq_len"], meta["d_model"], meta["vocab"]
    if name.startswith("block"):  # split: qkv (w, b), proj w, fc (w, b), proj w; whole: 6C
        return (12 * c * c + 7 * c) // tp + 6 * c
    if name == "head":  # LM head split by vocabulary, the final LayerNorm whole
        return c * v // tp + 2 * c
    return v * c // tp + t * c  # token embedding split by vocabulary, positions whole


def activation_elements(
    name: str, meta: dict[str, Any], b: int, tp: int = 1, sp: bool = False
) -> int:
    """Elements one layer's context saves for backward for a micro-batch of `b` samples (GPT
    layers), on one of `tp` ranks (`sp`: with sequence parallelism)."""
    t, c = meta.get("seq_len", 0), meta.get("d_model", 0)
    seq = tp if sp else 1  # the LayerNorms and column-layer inputs: split by sequence, or whole
    if name.startswith("block"):
        scores = t if meta.get("attention") == "tiled" else t * t  # logsumexp, or probabilities
        return (4 * b * t * c + 2 * b * t) // seq + (
            16 * b * t * c + b * meta.get("n_head", 1) * scores
        ) // tp
    if name == "head":
        return (2 * b * t * c + b * t) // seq
    return b * t  # the embedding keeps its token ids


def loss_gradient_elements(meta: dict[str, Any], b: int, tp: int = 1) -> int:
    """The loss gradient (b, T, V / tp) that the last stage holds from F to B."""
    return b * meta.get("seq_len", 0) * meta.get("vocab", 0) // tp


@dataclass(frozen=True)
class RankMemory:
    rank: int
    layers: str  # first..last global layer name
    params: int
    weights_bytes: int
    stash_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.stash_bytes


def per_rank(job: Any, threads: int = 0) -> list[RankMemory]:
    """The estimate for every rank of one pipeline (replicas and a stage's tp ranks hold the
    same). `threads`: a one-rank run taking that many micro-batches at once (mbthreads.py)
    holds that many micro-batches' activations, whatever its row's peak, and each worker but one
    may hold a layer's weight-gradient products while it waits for that layer's turn."""
    cfg, model, plan = job.cfg, job.model, job.plan
    tp, meta, sp = cfg.tp, model.meta, cfg.sequence_parallel
    shards = (cfg.dp or 1) if cfg.zero else 1
    per_param = bytes_per_param(cfg.dtype, cfg.optimizer, shards)
    width = _WIDTH[cfg.dtype]
    names = [s.name for s in model.layers]
    out = []
    for r, chunks in enumerate(plan.stages):
        layers = [i for k in chunks for i in job.bounds[k]]
        params = sum(shard_params(names[i], meta, model.layers[i].params, tp) for i in layers)
        b, last = cfg.micro_batch, len(names) - 1
        chunk_act = [
            sum(activation_elements(names[i], meta, b, tp, sp) for i in job.bounds[k])
            + (loss_gradient_elements(meta, b, tp) if last in job.bounds[k] else 0)
            for k in chunks
        ]
        held = threads or job.report.peak_stash[r]
        stash = held * max(chunk_act) * width
        if threads > 1:  # a worker waiting for its W turn holds that layer's gradient products
            biggest = max(shard_params(names[i], meta, model.layers[i].params, tp) for i in layers)
            stash += (threads - 1) * biggest * width
        span = f"{names[layers[0]]}..{names[layers[-1]]}" if len(layers) > 1 else names[layers[0]]
        out.append(RankMemory(r, span, params, round(params * per_param), stash))
    return out


def table(rows: list[RankMemory], tp: int = 1, sp: bool = False, zero_dp: int = 1) -> str:
    """The dry run's per-rank table, in GiB (`zero_dp`: ZeRO-1 shards over that many)."""
    gib = 2**30
    each = f", each of its {tp} tensor-parallel ranks" if tp > 1 else ""
    each += " (sequence parallel)" if sp else ""
    each += f", optimizer state 1/{zero_dp} per replica (--zero 1)" if zero_dp > 1 else ""
    lines = [
        f"memory per pipeline rank{each} (estimate: weights = parameters, gradients, optimizer "
        "state; stash = activations at the peak stash)",
        f"{'rank':>4}  {'layers':<16}  {'params':>9}  {'weights':>9}  {'stash':>9}  {'total':>9}",
    ]
    for m in rows:
        lines.append(
            f"{m.rank:>4}  {m.layers:<16}  {m.params / 1e6:>8.1f}M  {m.weights_bytes / gib:>6.2f}"
            f" GiB  {m.stash_bytes / gib:>5.2f} GiB  {m.total_bytes / gib:>5.2f} GiB"
        )
    return "\n".join(lines)
