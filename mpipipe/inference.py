"""Use a trained checkpoint: held-out loss (`eval`) and text generation (`generate`), both run
through the pipeline with a forward-only schedule on however many ranks are launched."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from mpipipe import checkpoint
from mpipipe.config import TrainConfig
from mpipipe.data import BYTES_VOCAB
from mpipipe.errors import ConfigError
from mpipipe.executor import MicroBatches
from mpipipe.job import Job, agree, prepare, scan_tokens
from mpipipe.parallel.grid import Grid
from mpipipe.runtime import Runtime, place
from mpipipe.xp import to_numpy


def config_of(path: str) -> tuple[Any, TrainConfig]:
    """The checkpoint `path` names (a step directory, or the newest usable one in DIR) and the
    training config stored in its manifest, with the layout left to this launch. Saves store
    --data as an absolute path, so this works from any directory (a relative path in an older
    manifest is taken as it is)."""
    from mpipipe import config

    step_dir = Path(path)
    if not checkpoint.is_step_dir(step_dir):
        found, _ = checkpoint.candidates(step_dir)
        if not found:
            raise checkpoint.CheckpointError(
                f"--resume {path}: no checkpoint there (expected DIR/step_N/manifest.json)"
            )
        step_dir = found[0]
    manifest = step_dir / "manifest.json"
    raw = checkpoint.read_manifest(step_dir)["config"]
    cfg = TrainConfig(**config.from_mapping(raw, str(manifest), unknown="ignore"))
    cfg = cfg.replace(
        pp=None,
        dp=None,
        tp=1,  # layout-free checkpoints: eval and generate run without tensor parallelism
        sequence_parallel=False,  # (which needs tp)
        resume=None,
        checkpoint_dir=None,
        metrics_file=None,
        schedule_file=None,
        emulate=None,
        schedule="1f1b",
        virtual_stages=None,
    )
    return step_dir, cfg


class _Pipeline:
    """A loaded model on this launch's pipeline, on the backend the training used (the rank
    runtime decides the device and the transport, as for training), running forward-only."""

    def __init__(self, job: Job, step_dir: Any, comm: MPI.Comm, reads: bool = False):
        self.job, self.grid = job, Grid.create(comm, job.cfg.pp, job.cfg.rank_order)
        if reads:  # ids outside the vocabulary, before the model is built
            agree(self.grid.world, lambda: scan_tokens(job, self.grid))
        device = agree(self.grid.world, lambda: place(job, self.grid))
        self.rt = Runtime(job, self.grid, device, training=False)
        self.step = agree(
            self.grid.world, lambda: checkpoint.load(step_dir, self.rt.stage, None, job.model)
        )
        self.exec = self.rt.eval_exec

    def say(self, text: str) -> None:
        if self.grid.world.Get_rank() == 0:
            print(text, flush=True)

    def close(self) -> None:
        self.rt.close()
        self.grid.free()


def evaluate(path: str, batches: int, comm: MPI.Comm | None = None) -> float:
    """Held-out loss of the checkpoint over `batches` global batches; prints bits per byte."""
    comm = comm or MPI.COMM_WORLD
    step_dir, cfg = agree(comm, lambda: config_of(path))  # a problem on any rank stops all
    job = agree(comm, lambda: prepare(cfg, comm.Get_size()))
    cfg = job.cfg  # with this launch's layout: each replica takes its slice of each batch
    m = cfg.microbatches * (cfg.dp or 1)
    pipe = _Pipeline(job, step_dir, comm, reads=True)
    total = 0.0
    for i in range(batches):
        x, y = job.dataset.batch(i, "eval", cfg.global_batch, pipe.rt.rows)
        losses = pipe.exec.run(pipe.rt.micro_batches(x, y))
        total += pipe.grid.world.allreduce(sum(losses), op=MPI.SUM) / m
    loss = total / batches
    pipe.say(
        f"{step_dir} (step {pipe.step}): held-out loss {loss:.4f} nats, "
        f"{loss / math.log(2):.4f} bits per byte, over {batches} batches of "
        f"{cfg.global_batch} x {cfg.seq_len} bytes"
    )
    pipe.close()
    return loss


def generate(
    path: str,
    prompt: str,
    tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    comm: MPI.Comm | None = None,
    out: Any = sys.stdout,
) -> bytes:
    """Sample `tokens` bytes after `prompt`, one forward pass through the pipeline per byte."""
    comm = comm or MPI.COMM_WORLD
    if tokens < 0 or temperature < 0 or top_k < 0:
        raise ConfigError("--tokens, --temperature and --top-k must be >= 0")
    step_dir, cfg = agree(comm, lambda: config_of(path))  # a problem on any rank stops all
    if not cfg.is_gpt:
        raise ConfigError(f"generate needs a gpt checkpoint; {step_dir} holds a {cfg.model}")
    if cfg.vocab not in (None, BYTES_VOCAB):
        raise ConfigError(
            f"generate samples bytes; {step_dir} was trained on a vocabulary of {cfg.vocab} "
            "(decode its ids with the tokenizer that made the data)"
        )
    cfg = cfg.replace(global_batch=1, microbatches=1)
    job = agree(comm, lambda: prepare(cfg, comm.Get_size()))
    pipe = _Pipeline(job, step_dir, comm)
    rng = np.random.default_rng(seed)
    text = list(prompt.encode())
    if not text:
        raise ConfigError("--prompt must not be empty")
    t = cfg.seq_len
    for _ in range(tokens):
        context = text[-t:]
        x = np.zeros((1, t), dtype=np.int64)  # right padding: causal attention never sees it
        x[0, : len(context)] = context
        pipe.exec.run(MicroBatches([pipe.rt.xp.asarray(x)] if pipe.rt.first else None, None))
        token = 0
        if pipe.rt.last:
            logits = to_numpy(pipe.exec.outputs[0])[0, len(context) - 1].astype(np.float64)
            token = _sample(logits, temperature, top_k, rng)
        text.append(pipe.grid.pp_comm.bcast(token, root=pipe.rt.last_rank))
    result = bytes(text)
    if pipe.grid.world.Get_rank() == 0:
        print(result.decode("utf-8", errors="replace"), file=out, flush=True)
    pipe.close()
    return result


def _sample(logits: np.ndarray, temperature: float, top_k: int, rng: Any) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k:
        cut = np.sort(z)[-min(top_k, len(z))]
        z = np.where(z < cut, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))
