"""Training configuration: one frozen dataclass, filled from defaults < TOML file < flags.

The dataclass is the single source of truth: the CLI flags (`--d-model` for `d_model`) and the
TOML keys (`d_model` or `d-model`) are generated from its fields and their help texts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpipipe.errors import ConfigError
from mpipipe.partition import METHODS
from mpipipe.schedule import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# GPT-2 shapes as published (layers, d_model, heads, seq_len, vocab); "gpt2-tiny" is the same
# vocabulary at a size that trains in seconds. A flag or TOML key given explicitly wins.
PRESETS: dict[str, dict[str, int]] = {
    name: dict(zip(("layers", "d_model", "heads", "seq_len", "vocab"), shape, strict=True))
    for name, shape in {
        "gpt2-tiny": (2, 32, 2, 32, 50257),
        "gpt2-small": (12, 768, 12, 1024, 50257),
        "gpt2-medium": (24, 1024, 16, 1024, 50257),
        "gpt2-large": (36, 1280, 20, 1024, 50257),
        "gpt2-xl": (48, 1600, 25, 1024, 50257),
    }.items()
}
MODELS = ("gpt", "mlp", *PRESETS)
OPTIMIZERS = ("adamw", "sgd")
DTYPES = ("float32", "float64", "fp32", "fp16", "bf16")


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    model: str = _opt(
        "gpt",
        "model family, or a GPT-2 preset that sets --layers, --d-model, --heads, --seq-len and "
        "--vocab (each still overridable)",
        choices=MODELS,
    )
    layers: int = _opt(4, "number of transformer blocks (gpt) or hidden layers (mlp)")
    d_model: int = _opt(128, "model width")
    heads: int = _opt(4, "attention heads (must divide --d-model)")
    seq_len: int = _opt(128, "tokens per sample")
    data: str | None = _opt(
        None,
        "text file, token file (OUT.bin with OUT.bin.json), HDF5 token dataset (FILE.h5:/NAME), "
        "a folder or a quoted glob of them (default: built-in corpus)",
    )
    eval_data: str | None = _opt(None, "held-out data like --data (default: --holdout of it)")
    holdout: float = _opt(0.1, "fraction of --data held out for eval (without --eval-data)")
    data_dtype: str | None = _opt(
        None, "token dtype of .bin files without a sidecar", choices=("uint16", "uint32")
    )
    vocab: int | None = _opt(None, "vocabulary size (default: from the data's metadata)")
    global_batch: int = _opt(32, "samples per optimizer step")
    microbatches: int = _opt(4, "micro-batches per step (must divide --global-batch)")
    pp: int | None = _opt(None, "pipeline stages (default: see --dp)")
    dp: int | None = _opt(
        None,
        "data-parallel replicas (default: ranks / pp; with neither flag, pp is the largest "
        "divisor of the ranks that the layers allow, the rest dp)",
    )
    tp: int = _opt(
        1,
        "tensor-parallel ranks per stage (Megatron: heads, MLP and vocabulary split; must divide "
        "--heads and the vocabulary); the tp group is innermost in rank numbers",
    )
    sequence_parallel: bool = _opt(
        False,
        "with --tp: LayerNorms, residual stream and pipeline messages hold 1/tp of the tokens "
        "(all-gather / reduce-scatter instead of all-reduce; --seq-len a multiple of --tp)",
    )
    rank_order: str = _opt(
        "dp",
        "which of pp and dp is contiguous in rank numbers (after tp, always innermost)",
        choices=("dp", "pp"),
    )
    bucket_mb: float = _opt(25.0, "gradient all-reduce bucket size in MB")
    overlap: str = _opt(
        "on",
        "start each bucket's all-reduce during backward (off: after it)",
        choices=("on", "off"),
    )
    zero: int = _opt(
        0,
        "ZeRO stage: 1 shards optimizer state and fp32 masters over the dp replicas (1/dp "
        "each; no-op with dp 1), 0: each replica holds all of it",
    )
    tie_embeddings: str = _opt(
        "no", "yes: the LM head uses the token embedding's weight (GPT-2)", choices=("no", "yes")
    )
    partition: str = _opt(
        "uniform",
        "how to split layers into stages: uniform (blocks evenly), params (balance parameter "
        "counts), time (balance F+B+W times measured at start, loss counted)",
        choices=METHODS,
    )
    attention: str = _opt(
        "dense",
        "attention core: tiled (FlashAttention-2 tiles, online softmax: keeps O(T) statistics, "
        "not the T x T scores, and skips the masked half) or dense (the reference)",
        choices=("tiled", "dense"),
    )
    microbatch_threads: str = _opt(
        "auto",
        "auto: one process holding the whole model (pp = dp = tp = 1, NumPy) runs a micro-batch "
        "on each of its cores at once, bitwise the serial run (mbthreads.py); off: one at a "
        "time, products and element-wise work threaded instead",
        choices=("auto", "off"),
    )
    recompute: str = _opt(
        "none",
        "activation recomputation: none, full (keep each stage's input, redo its forward in "
        "backward), selective (recompute only the attention scores: --attention dense; tiled "
        "always recomputes them)",
        choices=("none", "full", "selective"),
    )
    schedule: str = _opt(
        "1f1b",
        "pipeline schedule (interleaved: Megatron's virtual stages; zb-h1, zbv: zero bubble; "
        "auto: synthesized under --memory)",
        choices=(*sorted(SCHEDULES), "auto"),
    )
    memory: float | None = _opt(
        None,
        "--schedule auto: cap on stashed activations per rank, in "
        "micro-batches (see `schedule --memory`)",
    )
    virtual_stages: int | None = _opt(
        None, "chunks of layers per rank (interleaved: 2 or more, default 2; zbv: 2)"
    )
    schedule_file: str | None = _opt(
        None, "run a hand-written schedule: one line of actions per rank (see `schedule`)"
    )
    emulate: str | None = _opt(
        None,
        "sleep instead of computing: F=ms,B=ms,W=ms per layer and sample (measures the runtime)",
    )
    steps: int = _opt(400, "optimizer steps in total")
    lr: float = _opt(3e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine)")
    warmup: int = _opt(20, "linear warm-up steps")
    optimizer: str = _opt("adamw", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _opt(0.1, "decoupled weight decay (matrices only)")
    momentum: float = _opt(0.9, "SGD momentum")
    clip: float = _opt(1.0, "clip gradients to this global norm (0: off)")
    seed: int = _opt(1234, "seed for initialisation and data order")
    dtype: str = _opt(
        "float32",
        "compute dtype: float32 (= fp32), float64, fp16 (fp32 master weights and optimizer "
        "state, dynamic loss scaling, activations sent in fp16), bf16 (the same without loss "
        "scaling; needs ml_dtypes)",
        choices=DTYPES,
    )
    loss_scale: float = _opt(2.0**15, "fp16: the initial loss scale (dynamic)")
    backend: str = _opt(
        "auto",
        "array backend: auto (CuPy when a GPU is visible), numpy, cupy",
        choices=("auto", "numpy", "cupy"),
    )
    cuda_aware: str = _opt(
        "auto",
        "pass GPU buffers to MPI directly: auto (ask the MPI library), yes, no",
        choices=("auto", "yes", "no"),
    )
    share_gpus: str = _opt(
        "no", "allow more ranks than GPUs on a node (they share GPUs)", choices=("no", "yes")
    )
    log_every: int = _opt(10, "print a log line every N steps")
    eval_every: int = _opt(100, "evaluate on held-out data every N steps (0: only at the end)")
    eval_batches: int = _opt(4, "held-out batches per evaluation")
    metrics_file: str | None = _opt(None, "write one JSON object per step to this .jsonl file")
    checkpoint_dir: str | None = _opt(None, "save HDF5 checkpoints here (and at the end)")
    save_every: int = _opt(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(0, "keep only the newest K checkpoints (0: keep all)")
    timeout_s: float = _opt(
        900.0, "watchdog: abort (saying where) if a rank makes no progress this long (0: off)"
    )
    trace: str | None = _opt(None, "write a Chrome/Perfetto trace of all ranks to this .json")
    trace_steps: int = _opt(3, "steps to trace (from the second step on)")
    peak_tflops: float = _opt(
        0.0, "per-rank peak for MFU, TFLOP/s (0: measure a matrix product at start)"
    )
    resume: str | None = _opt(
        None,
        "resume from a checkpoint (DIR/step_N, or DIR: its newest usable one), or 'auto': the "
        "newest usable one in --checkpoint-dir, fresh if it holds none",
    )
    inject_fault: str | None = _opt(
        None, "tests and drills: KIND@RANK:STEP[,...], kinds raise, stall, kill-in-save"
    )

    # -- derived -------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch on one replica."""
        return self.global_batch // ((self.dp or 1) * self.microbatches)  # tp ranks share it

    @property
    def is_gpt(self) -> bool:
        """A GPT decoder: `gpt` or one of the GPT-2 presets."""
        return self.model == "gpt" or self.model in PRESETS

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every rule that needs no data, model or launch (see `layout`)."""
        for name in (
            "layers",
            "d_model",
            "heads",
            "seq_len",
            "global_batch",
            "microbatches",
            "steps",
            "log_every",
            "eval_batches",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} {getattr(self, name)} must be at least 1")
        for f in fields():
            check_choice(f, getattr(self, f.name), f"--{_flag(f.name)}")
        _check_ranges(self)
        if self.dtype == "fp32":
            return self.replace(dtype="float32").validate()
        if self.global_batch % self.microbatches:
            divisors = [d for d in range(1, self.global_batch + 1) if self.global_batch % d == 0]
            near = min(divisors, key=lambda d: abs(d - self.microbatches))
            raise ConfigError(
                f"--microbatches {self.microbatches} does not divide --global-batch "
                f"{self.global_batch} (choose a divisor of {self.global_batch}, e.g. {near})"
            )
        if self.vocab is not None and self.vocab < 1:
            raise ConfigError(f"--vocab {self.vocab} must be at least 1")
        if self.holdout == 0 and not self.eval_data:
            raise ConfigError(
                "--holdout 0 leaves no eval split (give --holdout 0.1, or --eval-data PATH)"
            )
        if self.is_gpt and self.d_model % self.heads:
            raise ConfigError(
                f"--heads {self.heads} does not divide --d-model {self.d_model} "
                "(choose a divisor, e.g. --heads 4 with --d-model 128)"
            )
        for name in ("pp", "dp", "tp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} {value} must be at least 1")
        if self.tie_embeddings == "yes" and not self.is_gpt:
            raise ConfigError(f"--tie-embeddings yes needs a GPT model (not --model {self.model})")
        if self.zero not in (0, 1):
            raise ConfigError(f"--zero {self.zero}: choose 0 (off) or 1 (shard optimizer state)")
        if self.tp > 1:
            if not self.is_gpt:
                raise ConfigError(
                    f"--tp {self.tp} needs a GPT model (--model {self.model} has no attention "
                    "heads to split: use --tp 1, or --model gpt)"
                )
            from mpipipe.parallel.tensor import check  # noqa: PLC0415 - loads mpi4py

            if problem := check(self.heads, self.d_model, self.vocab or self.tp, self.tp):
                raise ConfigError(problem)
        if self.sequence_parallel:
            from mpipipe.parallel.sequence import check as sp_check  # noqa: PLC0415

            if problem := sp_check(self.tp, self.seq_len):
                raise ConfigError(problem)
        if self.resume == "auto" and not self.checkpoint_dir:
            raise ConfigError("--resume auto needs --checkpoint-dir (where to look)")
        from mpipipe.faults import Faults  # noqa: PLC0415 - avoid an import cycle
        from mpipipe.schedule import chunks_for  # noqa: PLC0415

        Faults.parse(self.inject_fault)

        if (self.schedule == "auto") != (self.memory is not None) and not self.schedule_file:
            raise ConfigError("--schedule auto and --memory K go together (give both, or neither)")
        if self.schedule == "auto" and self.virtual_stages is not None:
            raise ConfigError(
                "--schedule auto picks its chunks itself (leave --virtual-stages out)"
            )
        if self.schedule_file is None and self.schedule != "auto":
            chunks_for(self.schedule, self.virtual_stages)  # unknown name, bad chunk count
        return self

    def layout(self, world_size: int, max_pp: int) -> TrainConfig:
        """Fill in (pp, dp) for `world_size` ranks, of which each tp consecutive ones split one
        stage; `max_pp` is the most stages the model's layers allow. With neither given: the
        largest pp <= max_pp dividing world size / tp."""
        if world_size % self.tp:
            n = world_size
            raise ConfigError(
                f"the world size {n} is not a multiple of --tp {self.tp} (launch a multiple of "
                f"{self.tp} ranks, or pick --tp dividing {n})"
            )
        pp, dp, n = self.pp, self.dp, world_size // self.tp
        tp = f" x --tp {self.tp}" if self.tp > 1 else ""
        if pp is not None and dp is not None and pp * dp != n:
            want, launched = pp * dp * self.tp, world_size
            raise ConfigError(
                f"--pp {pp} x --dp {dp}{tp} = {want} but {launched} "
                f"rank{'s were' if launched > 1 else ' was'} launched (launch {want} ranks, or "
                f"make pp x dp{' x tp' if tp else ''} = {launched})"
            )
        for name, value in (("pp", pp), ("dp", dp)):
            if value is not None and n % value:
                per = f" / --tp {self.tp} = {n}" if tp else ""
                raise ConfigError(
                    f"the world size {world_size}{per} is not a multiple of --{name} {value} "
                    f"(launch a multiple of {value * self.tp} ranks, or pick --{name} dividing "
                    f"{n})"
                )
        if pp is None and dp is None:
            pp = max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, max_pp))
        if pp is None:
            assert dp is not None
            pp = n // dp
        dp = n // pp
        if self.global_batch % (dp * self.microbatches):
            unit = dp * self.microbatches
            raise ConfigError(
                f"--global-batch {self.global_batch} does not split into --dp {dp} replicas x "
                f"--microbatches {self.microbatches} (make it a multiple of {unit}, e.g. "
                f"{unit * max(1, round(self.global_batch / unit))})"
            )
        return self.replace(pp=pp, dp=dp)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(TrainConfig))


def check_choice(f: dataclasses.Field[Any], value: Any, where: str) -> None:
    """The one check of a field's `choices` (its metadata, which also feeds the CLI's help), for
    flags, TOML files and manifests alike; `where` names the flag or key as the user wrote it."""
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where} {value!r} is not one of: {', '.join(choices)}")


POSITIVE, NON_NEGATIVE = "a positive finite number", "a finite number >= 0"
COUNT = "an integer >= 0"
_RULES: dict[str, Callable[[float], bool]] = {
    POSITIVE: lambda v: v > 0,
    NON_NEGATIVE: lambda v: v >= 0,
    COUNT: lambda v: v >= 0,
    "a number in [0, 1]": lambda v: 0 <= v <= 1,
    "a number in [0, 1)": lambda v: 0 <= v < 1,
}
# field: (rule, an example the message suggests)
_RANGES = {
    "lr": (POSITIVE, "3e-4"),
    "loss_scale": (POSITIVE, "32768"),
    "bucket_mb": (POSITIVE, "25"),
    "weight_decay": (NON_NEGATIVE, "0.1"),
    "clip": (NON_NEGATIVE, "1.0, or 0: off"),
    "timeout_s": (NON_NEGATIVE, "900, or 0: off"),
    "peak_tflops": (NON_NEGATIVE, "0: measure"),
    "min_lr_ratio": ("a number in [0, 1]", "0.1"),
    "momentum": ("a number in [0, 1)", "0.9"),
    "holdout": ("a number in [0, 1)", "0.1"),
    "warmup": (COUNT, "20"),
    "save_every": (COUNT, "100, or 0: only at the end"),
    "keep_last": (COUNT, "3, or 0: keep all"),
    "eval_every": (COUNT, "100, or 0: only at the end"),
    "trace_steps": (COUNT, "3"),
    "seed": (COUNT, "1234"),
}


def _check_ranges(cfg: TrainConfig) -> None:
    """Hyperparameters in range: a negative or non-finite learning rate, loss scale, ... would
    run and silently train nothing (or divide by zero) instead of failing here."""
    for name, (rule, example) in _RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and _RULES[rule](value)):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ConfigError(f"--{_flag(name)} {shown} must be {rule} (e.g. {example})")


def _coerce(f: dataclasses.Field[Any], value: Any, origin: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        return None
    try:
        if isinstance(value, (dict, list)):
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        value = str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{origin}: {_flag(f.name)} = {value!r} is not a valid {kind}") from None
    check_choice(f, value, f"{origin}: {_flag(f.name)} =")
    return value


def from_mapping(raw: dict[str, Any], origin: str, unknown: str = "error") -> dict[str, Any]:
    """{field: value} from keys spelled `d_model` or `d-model`, each coerced to its field's type
    and checked against its choices; `unknown` keys are an "error" or "ignore"d (a manifest
    written by another mpipipe version may have more)."""
    known = {f.name: f for f in fields()}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            if unknown == "ignore":
                continue
            raise ConfigError(f"{origin}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        if name in out:
            raise ConfigError(f"{origin}: {_flag(name)} is given twice (as {name} and {key})")
        out[name] = _coerce(known[name], value, origin)
    return out


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file of config keys (`d_model` or `d-model`), all at the top level or all
    under `[train]`; unknown keys, bad values and a mix of both places are errors."""
    p, origin = Path(path), f"--config {path}"
    if p.is_dir() or not p.exists():
        raise ConfigError(f"{origin}: no such file (give a TOML file of training keys)")
    try:
        text = p.read_bytes().decode("utf-8")
        raw = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"{origin}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{origin}: not UTF-8 text (a binary file?)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML ({e})") from None
    if "train" in raw:
        table, rest = raw["train"], sorted(k for k in raw if k != "train")
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: train must be a [train] table of keys, not a value")
        if rest:
            raise ConfigError(
                f"{origin}: keys at the top level ({', '.join(rest)}) and under [train]: put "
                "them all under [train] (or all at the top level)"
            )
        raw = table
    if not raw:
        raise ConfigError(f"{origin}: holds no keys (an empty file?): give training keys")
    return from_mapping(raw, origin)


def build(flags: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """defaults < --model preset < TOML file < flags (flags given as None are 'not given')."""
    values = load_toml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**{**PRESETS.get(values.get("model", ""), {}), **values})
