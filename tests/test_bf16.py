"""bf16 (--dtype bf16): every layer in bfloat16 against the float64 reference, mixed precision
without loss scaling, what a checkpoint needs to store it, and the acceptance criterion: the
tiny model trained 100 steps on 1, 2 and 4 ranks ends within 0.05 nats of float32; the same
run on the strict fake GPU equals NumPy bit for bit.

Tolerance: bfloat16 keeps 8 significant bits (7 stored), so one rounding errs by up to
u = 2^-8 (0.4%) of the value. A layer's result passes through a handful of roundings (its
inputs and parameters are bf16-exact here, so only the computation differs), hence TOL = 8u =
2^-5 (3.1%), relative to the largest entry; the deepest layer, the block, measures about 4u.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mpipipe import optim
from mpipipe.config import TrainConfig
from mpipipe.kernels.loss import cross_entropy_forward, cross_entropy_forward_backward
from mpipipe.layers import (
    GELU,
    MLP,
    Attention,
    Block,
    Embedding,
    Head,
    Init,
    LayerNorm,
    Linear,
    Residual,
)
from mpipipe.xp import copy_into, dtype_of, gpu_count, is_half, storable, to_numpy
from tests import mpirun
from tests.gradcheck import rel_error
from tests.test_device_path import BASE, FAKE, STAGED, numbers

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 8 * 2.0**-8
B, T, C, H, V = 2, 5, 8, 2, 11

LAYERS = {
    "linear": lambda i: Linear(i, C, 7),
    "linear_nobias": lambda i: Linear(i, C, 7, bias=False),
    "layernorm": lambda i: LayerNorm(i, C),
    "gelu": lambda i: GELU(),
    "attention": lambda i: Attention(i, C, H),  # dense
    "attention_tiled": lambda i: Attention(i, C, H, kernel="tiled"),
    "mlp": lambda i: MLP(i, C),
    "residual": lambda i: Residual([("ln", LayerNorm(i, C)), ("fc", Linear(i, C, C))]),
    "block": lambda i: Block(i, C, H, n_layer=2),
    "head": lambda i: Head(i, C, V),
    "embedding": lambda i: Embedding(i, V, C, max_len=T + 3),
}
BACKENDS = [
    "numpy",
    pytest.param("cupy", marks=pytest.mark.skipif(gpu_count() == 0, reason="needs a GPU")),
]


def module(backend):
    if backend == "numpy":
        return np
    import cupy

    return cupy


def run_layer(layer, x, dy):
    """(output, input gradient or None, weight gradients) for one forward and backward."""
    y, ctx = layer.forward(x)
    dx, wctx = layer.backward_input(dy, ctx)
    layer.backward_weight(wctx)
    return y, dx, layer.grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_in_bf16_matches_float64(name, backend):
    """The float64 layer (checked against finite differences in test_layers) and the same layer
    in bf16 on bf16-exact parameters, input and output gradient: bf16 outputs and gradients,
    within TOL."""
    xp = module(backend)
    ref = LAYERS[name](Init.for_layer(0, 0, np.float64, np))
    low = LAYERS[name](Init.for_layer(0, 0, BF16, xp))
    rng = np.random.default_rng(2)
    for k, p in ref.params.items():
        p[...] = (p + 0.3 * rng.normal(size=p.shape)).astype(BF16)  # non-trivial, bf16-exact
        copy_into(low.params[k], p.astype(BF16))
    if name == "embedding":
        x = np.array([[1, 3, 3, 0, 10], [3, 3, 2, 1, 1]])  # repeated tokens accumulate
        x_low = xp.asarray(x)
    else:
        x = rng.normal(size=(B, T, C)).astype(BF16).astype(np.float64)
        x_low = xp.asarray(x.astype(BF16))
    dy = rng.normal(size=ref.forward(x)[0].shape).astype(BF16)
    y, dx, grads = run_layer(ref, x, dy.astype(np.float64))
    y_low, dx_low, grads_low = run_layer(low, x_low, xp.asarray(dy))

    def error(a, b):
        assert a.dtype == BF16
        return rel_error(to_numpy(a).astype(np.float64), b)

    errors = {"output": error(y_low, y), **{k: error(grads_low[k], g) for k, g in grads.items()}}
    if dx is not None:
        errors["input"] = error(dx_low, dx)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{name} in bf16: relative errors above {TOL}: {bad}"


def test_cross_entropy_of_bf16_logits_is_float32():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, T, V)).astype(BF16)
    targets = rng.integers(0, V, size=(B, T))
    ref_loss, ref_grad = cross_entropy_forward_backward(logits.astype(np.float64), targets, 0.5)
    loss, grad = cross_entropy_forward_backward(logits, targets, 0.5)
    assert loss.dtype == np.float32 and grad.dtype == BF16
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)  # float32 on exact inputs
    assert float(cross_entropy_forward(logits, targets)) == pytest.approx(float(ref_loss), 1e-6)
    assert rel_error(grad.astype(np.float64), ref_grad) < TOL


def test_dtype_names_and_16_bit_floats():
    assert dtype_of("bf16") == BF16 and dtype_of("fp16") == np.float16
    assert is_half(BF16) and is_half(np.float16)
    assert not any(is_half(t) for t in (np.float32, np.float64, np.int16, np.uint16))


def test_storable_widens_bf16_exactly_and_copy_into_restores_it(tmp_path):
    """What a checkpoint of a bf16 run writes: float32 (h5py has no bfloat16), read back into
    the bf16 parameter bit for bit; other dtypes are stored as they are."""
    a = np.random.default_rng(0).normal(size=(3, 4)).astype(BF16)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("a", data=storable(a))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        stored = f["a"][...]
    assert stored.dtype == np.float32
    back = np.empty_like(a)
    copy_into(back, stored)
    assert back.tobytes() == a.tobytes()
    for t in (np.float16, np.float32, np.float64):
        x = a.astype(t)
        assert storable(x).dtype == t and storable(x).tobytes() == x.tobytes()


def test_mixed_precision_bf16_steps_float32_masters_without_loss_scaling():
    """bf16's optimizer is float32 AdamW on the widened gradients, with the bf16 weights
    refreshed from its masters; no loss scale, nothing skipped, a non-finite gradient stops."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3)).astype(BF16)
    opt = optim.make("adamw", {"w": w}, TrainConfig(dtype="bf16"))
    ref_w = w.astype(np.float32)
    ref = optim.make("adamw", {"w": ref_w}, TrainConfig(dtype="float32"))
    assert opt.loss_scale == 1.0 and opt.scalars() == {}
    assert opt.overflowed() is False and opt.loss_scale == 1.0  # the run stops, as in float32
    for _ in range(3):
        g = rng.normal(size=w.shape).astype(BF16)
        opt.step({"w": g}, 1e-2, factor=0.5)
        ref.step({"w": g.astype(np.float32)}, 1e-2, factor=0.5)
    t, slots = opt.state_dict()
    assert t == 3 and slots["master"]["w"].dtype == np.float32
    assert slots["master"]["w"].tobytes() == ref_w.tobytes()
    assert w.dtype == BF16 and w.tobytes() == ref_w.astype(BF16).tobytes()


# -- whole runs --------------------------------------------------------------------------------
# 100 steps of the tiny model take 8-13 s per run on 2 busy cores (load average 9). Five runs:
# bf16 on 1, 2 (pp 2) and 4 ranks (pp 2 x dp 2: pipeline messages and float32 bucket sums);
# float32 on 1 and 4. A float32 pipeline equals the single process bit for bit
# (test_transparency), so the 1-rank float32 run is the 2-rank layout's reference too.
# --peak-tflops 1 skips the MFU reference's matmul timing, which these runs do not test.
FLAGS = [*mpirun.TINY, "--eval-every", "0", "--steps", "100", "--peak-tflops", "1"]
RUNS = {
    "float32-1": (1, ["--dtype", "float32"]),
    "bf16-1": (1, ["--dtype", "bf16"]),
    "bf16-2": (2, ["--dtype", "bf16", "--pp", "2"]),
    "float32-4": (4, ["--dtype", "float32", "--pp", "2", "--dp", "2"]),
    "bf16-4": (4, ["--dtype", "bf16", "--pp", "2", "--dp", "2"]),
}


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    out = {}
    for name, (n, flags) in RUNS.items():
        m = tmp / f"{name}.jsonl"
        r = mpirun.train(n, *FLAGS, *flags, "--metrics-file", str(m), timeout=240)
        assert r.returncode == 0, r.output
        out[name] = [json.loads(line) for line in m.read_text().splitlines()]
    return out


@pytest.mark.parametrize("ranks, reference", [(1, 1), (2, 1), (4, 4)])
def test_bf16_trains_within_0_05_nats_of_float32(losses, ranks, reference):
    low, full = losses[f"bf16-{ranks}"], losses[f"float32-{reference}"]
    assert len(low) == 100 and low[-1]["pp"] * low[-1]["dp"] == ranks
    assert low[-1]["loss"] < low[0]["loss"] - 1.0  # it learns
    assert abs(low[-1]["loss"] - full[-1]["loss"]) < 0.05, (low[-1]["loss"], full[-1]["loss"])
    assert "loss_scale" not in low[-1]  # no loss scaling to report


def test_bf16_pipeline_equals_bf16_single_process_bitwise(losses):
    """The transparency claim holds in bf16 too: the same operations in the same order."""
    assert [r["loss"] for r in losses["bf16-2"]] == [r["loss"] for r in losses["bf16-1"]]


def run_on_fake_gpu(tmp_path, name, n, *flags):
    """One run with the fake CuPy on the path (tests/test_device_path.py's BASE model)."""
    m = tmp_path / f"{name}.jsonl"
    r = mpirun.train(n, *BASE, *flags, "--metrics-file", str(m), timeout=120, **FAKE)
    assert r.returncode == 0, r.output
    return numbers(m), r


def test_bf16_on_the_fake_gpu_equals_numpy_bf16(tmp_path):
    """pp 2 x dp 2 staged through host memory on the strict fake CuPy: 2-byte messages, float32
    bucket sums and the embedding's float32 scatter-add (the fake, like CuPy, has no bfloat16
    add.at) give NumPy's numbers bit for bit."""
    flags = ["--pp", "2", "--dp", "2", "--dtype", "bf16"]
    host, _ = run_on_fake_gpu(tmp_path, "bf16-numpy", 4, *flags, "--backend", "numpy")
    dev, _ = run_on_fake_gpu(tmp_path, "bf16-fake", 4, *flags, *STAGED)
    assert dev == host


def test_bf16_checkpoint_saves_float32_and_resumes_exactly(tmp_path):
    """A bf16 run's checkpoint holds float32 datasets (bf16 widened exactly, fp32 masters and
    state); saved on 2 ranks and resumed on 1, steps 3-4 equal a straight 4-step run."""
    flags = [*mpirun.TINY, "--dtype", "bf16", "--eval-every", "0", "--steps"]
    ck, straight, resumed = tmp_path / "ck", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    r = mpirun.train(1, *flags, "4", "--metrics-file", str(straight), timeout=120)
    assert r.returncode == 0, r.output
    r = mpirun.train(2, *flags, "2", "--checkpoint-dir", str(ck), timeout=120)
    assert r.returncode == 0, r.output
    more = ["--checkpoint-dir", str(ck), "--resume", "auto", "--metrics-file", str(resumed)]
    r = mpirun.train(1, *flags, "4", *more, timeout=120)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.output

    def losses(p):
        return [json.loads(line)["loss"] for line in p.read_text().splitlines()]

    assert losses(resumed) == losses(straight)[2:]
    with h5py.File(ck / "step_000002" / "shard_000.h5", "r") as f:
        kinds = set()
        f.visititems(lambda n, o: kinds.add(o.dtype.str) if isinstance(o, h5py.Dataset) else None)
    assert kinds == {"<f4"}, kinds
