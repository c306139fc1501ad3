"""Memory per pipeline rank, estimated from the config alone (the dry run builds no model).

    weights   parameters, gradients and optimizer state: bytes per parameter by dtype and
              optimizer (fp16/bf16 add fp32 master weights and fp32 gradients)
    stash     saved activations at the schedule's peak stash (the checker's count), per
              micro-batch b x T x C (H heads, vocabulary V):
                block  16 bTC + b H T^2 elements (LayerNorm, qkv, attention probabilities,
                       projections, the 4C-wide MLP; no dropout)
                head   2 bTV + 2 bTC (logits and probabilities, the final LayerNorm)
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


def activation_elements(name: str, meta: dict[str, Any], b: int) -> int:
    """Elements one layer saves for backward for a micro-batch of `b` samples (GPT layers)."""
    t, c = meta.get("seq_len", 0), meta.get("d_model", 0)
    if name.startswith("block"):
        return 16 * b * t * c + b * meta.get("n_head", 1) * t * t
    if name == "head":
        return 2 * b * t * meta.get("vocab", 0) + 2 * b * t * c
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
    """The estimate for every rank of one pipeline (replicas hold the same)."""
    cfg, model, plan = job.cfg, job.model, job.plan
    per_param = bytes_per_param(cfg.dtype, cfg.optimizer)
    width = _WIDTH[cfg.dtype]
    names = [s.name for s in model.layers]
    out = []
    for r, chunks in enumerate(plan.stages):
        layers = [i for k in chunks for i in job.bounds[k]]
        params = sum(model.layers[i].params for i in layers)
        chunk_act = [
            sum(activation_elements(names[i], model.meta, cfg.micro_batch) for i in job.bounds[k])
            for k in chunks
        ]
        stash = job.report.peak_stash[r] * max(chunk_act) * width
        span = f"{names[layers[0]]}..{names[layers[-1]]}" if len(layers) > 1 else names[layers[0]]
        out.append(RankMemory(r, span, params, params * per_param, stash))
    return out


def table(rows: list[RankMemory]) -> str:
    """The dry run's per-rank table, in GiB."""
    gib = 2**30
    lines = [
        "memory per pipeline rank (estimate: weights = parameters, gradients, optimizer state; "
        "stash = activations at the peak stash)",
        f"{'rank':>4}  {'layers':<16}  {'params':>9}  {'weights':>9}  {'stash':>9}  {'total':>9}",
    ]
    for m in rows:
        lines.append(
            f"{m.rank:>4}  {m.layers:<16}  {m.params / 1e6:>8.1f}M  {m.weights_bytes / gib:>6.2f}"
            f" GiB  {m.stash_bytes / gib:>5.2f} GiB  {m.total_bytes / gib:>5.2f} GiB"
        )
    return "\n".join(lines)
