"""Memory per pipeline rank, estimated from the config alone (the dry run builds no model).

    weights   parameters, gradients and optimizer state: bytes per parameter by dtype and
              optimizer (fp16/bf16 add fp32 master weights and fp32 gradients)
    stash     saved activations at the schedule's peak stash (the checker's count), per
              micro-batch b x T x C (H heads, vocabulary V):
                block  16 bTC + b H T^2 elements (LayerNorm, qkv, attention probabilities,
                       projections, the 4C-wide MLP; no dropout); b H T instead of b H T^2
                       with --attention tiled (a logsumexp per row, not the probabilities)
                head   2 bTV + 2 bTC (logits and probabilities, the final LayerNorm)
With tensor parallelism (tp) a rank holds 1/tp of each split tensor (qkv, fc and their biases,
the proj weights, the token embedding, the LM head) and whole copies of the rest (LayerNorms,
the row-parallel biases, the position embedding); of a block's saved activations, the 12 bTC
after the column-parallel products and the attention probabilities are split, the 4 bTC at the
LayerNorms are whole; the head's logits and probabilities are split.
The estimate leaves out receive buffers and transient workspaces; `stash_mb` and `max_rss_mb`
in the metrics file are the measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_WIDTH = {"float32": 4, "float64": 8, "fp16": 2, "bf16": 2}
_SLOTS = {"adamw": 2, "sgd": 1}


def bytes_per_param(dtype: str, optimizer: str) -> int:
    """Parameter + gradient + optimizer state bytes for one parameter."""
    w, slots = _WIDTH[dtype], _SLOTS[optimizer]
    if w == 2:  # fp32 masters, fp32 gradients and fp32 slots beside the 16-bit copies
        return 2 * w + 4 * (2 + slots)
    return w * (2 + slots)


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


def activation_elements(name: str, meta: dict[str, Any], b: int, tp: int = 1) -> int:
    """Elements one layer saves for backward for a micro-batch of `b` samples (GPT layers), on
    one of `tp` ranks."""
    t, c = meta.get("seq_len", 0), meta.get("d_model", 0)
    if name.startswith("block"):
        scores = t if meta.get("attention") == "tiled" else t * t  # logsumexp, or probabilities
        return 4 * b * t * c + (12 * b * t * c + b * meta.get("n_head", 1) * scores) // tp
    if name == "head":
        return 2 * b * t * meta.get("vocab", 0) // tp + 2 * b * t * c
    return b * t  # the embedding keeps its token ids


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


def per_rank(job: Any) -> list[RankMemory]:
    """The estimate for every rank of one pipeline (replicas and a stage's tp ranks hold the
    same)."""
    cfg, model, plan = job.cfg, job.model, job.plan
    tp, meta = getattr(cfg, "tp", 1) or 1, model.meta
    per_param = bytes_per_param(cfg.dtype, cfg.optimizer)
    width = _WIDTH[cfg.dtype]
    names = [s.name for s in model.layers]
    out = []
    for r, chunks in enumerate(plan.stages):
        layers = [i for k in chunks for i in job.bounds[k]]
        params = sum(shard_params(names[i], meta, model.layers[i].params, tp) for i in layers)
        chunk_act = [
            sum(activation_elements(names[i], meta, cfg.micro_batch, tp) for i in job.bounds[k])
            for k in chunks
        ]
        stash = job.report.peak_stash[r] * max(chunk_act) * width
        span = f"{names[layers[0]]}..{names[layers[-1]]}" if len(layers) > 1 else names[layers[0]]
        out.append(RankMemory(r, span, params, params * per_param, stash))
    return out


def table(rows: list[RankMemory], tp: int = 1) -> str:
    """The dry run's per-rank table, in GiB."""
    gib = 2**30
    each = f", each of its {tp} tensor-parallel ranks" if tp > 1 else ""
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
