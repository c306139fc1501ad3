"""Config validation, partitioning, data, optimizers: pure units, no MPI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipipe import optim
from mpipipe.config import TrainConfig, build, load_toml
from mpipipe.data import Corpus, TokenDataset, builtin_files, resolve
from mpipipe.errors import ConfigError
from mpipipe.partition import uniform


# -- config ------------------------------------------------------------------------------------
def test_default_layout_is_the_largest_pp_the_layers_allow():
    assert (TrainConfig().layout(4, max_pp=4).pp, TrainConfig().layout(4, max_pp=4).dp) == (4, 1)
    cfg = TrainConfig().layout(16, max_pp=4)
    assert (cfg.pp, cfg.dp) == (4, 4)
    cfg = TrainConfig(global_batch=48).layout(12, max_pp=5)
    assert (cfg.pp, cfg.dp) == (4, 3)
    assert TrainConfig(dp=2).layout(8, max_pp=8).pp == 4
    assert TrainConfig(pp=2).layout(8, max_pp=8).dp == 4


def test_layout_errors():
    with pytest.raises(ConfigError, match=r"--pp 2 x --dp 3 = 6 but 8 ranks were launched"):
        TrainConfig(pp=2, dp=3).layout(8, max_pp=8)
    with pytest.raises(ConfigError, match="world size 8 is not a multiple of --dp 3"):
        TrainConfig(dp=3).layout(8, max_pp=8)
    with pytest.raises(
        ConfigError,
        match=r"--global-batch 32 does not split into --dp 4 "
        r"replicas x --microbatches 16 \(make it a multiple",
    ):
        TrainConfig(microbatches=16).layout(8, max_pp=2)


def test_microbatches_must_divide_global_batch():
    with pytest.raises(
        ConfigError,
        match=r"--microbatches 6 does not divide --global-batch 32 "
        r"\(choose a divisor of 32, e.g. 4\)",
    ):
        TrainConfig(microbatches=6).validate()


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="--heads 3 does not divide --d-model 128"):
        TrainConfig(heads=3).validate()


def test_world_size_must_be_multiple_of_pp():
    with pytest.raises(ConfigError, match="world size 4 is not a multiple of --pp 3"):
        TrainConfig(pp=3).layout(4, max_pp=4)


def test_toml_then_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\nd-model = 64\nsteps = 7\nschedule = "gpipe"\n')
    cfg = build({"steps": 9, "lr": None}, str(f))
    assert (cfg.d_model, cfg.steps, cfg.schedule, cfg.lr) == (64, 9, "gpipe", TrainConfig().lr)


def test_toml_unknown_key_and_bad_type(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("dmodel = 64\n")
    with pytest.raises(ConfigError, match="unknown key 'dmodel'"):
        load_toml(str(f))
    f.write_text("steps = 'many'\n")
    with pytest.raises(ConfigError, match="steps = 'many' is not a valid int"):
        load_toml(str(f))


# -- partition ---------------------------------------------------------------------------------
def test_partition_body_layers_evenly_embedding_and_head_ride_along():
    body = [False] + [True] * 5 + [False]  # embed, 5 blocks, head
    assert uniform(body, 1) == [range(0, 7)]
    assert uniform(body, 2) == [range(0, 4), range(4, 7)]
    assert uniform(body, 5) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 7)]


def test_partition_rejects_more_stages_than_layers():
    with pytest.raises(
        ConfigError,
        match=r"4 pipeline stages but the model has only 2 layers "
        r"\(use --pp <= 2, or --layers >= 4\)",
    ):
        uniform([False, True, True, False], 4)


# -- data --------------------------------------------------------------------------------------
def test_builtin_corpus_is_the_stdlib():
    files = builtin_files()
    assert files == sorted(files) and len(files) > 50
    assert sum(f.stat().st_size for f in files) > 1_000_000


def test_batches_are_deterministic_and_shifted(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 20)
    ds = TokenDataset(Corpus(resolve(str(tmp_path))), seq_len=16, seed=3)
    x, y = ds.batch(5, "train", 4)
    x2, y2 = TokenDataset(Corpus(resolve(str(tmp_path / "*.txt"))), 16, 3).batch(5, "train", 4)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert not np.array_equal(x, ds.batch(6, "train", 4)[0])
    xe, _ = ds.batch(0, "eval", 4)  # held-out windows come from the last 10 % of the bytes
    n = len(ds.train)
    cut = n - int(n * 0.1)
    assert all((ds.train.read(cut, n) == row[0]).any() for row in xe)


def test_train_windows_never_read_the_held_out_bytes(tmp_path):
    # 900 training bytes below 100, then the held-out tenth: 100 bytes of 255
    (tmp_path / "a.txt").write_bytes(bytes(range(100)) * 9 + bytes([255]) * 100)
    ds = TokenDataset(Corpus(resolve(str(tmp_path / "a.txt"))), seq_len=8, seed=0)
    for step in range(50):
        x, y = ds.batch(step, "train", 16)
        assert x.max() < 100 and y.max() < 100, step
        xe, ye = ds.batch(step, "eval", 4)
        assert (xe == 255).all() and (ye == 255).all(), step


def test_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="--data nowhere.txt: no such file"):
        resolve("nowhere.txt")
    (tmp_path / "tiny.txt").write_text("x" * 200)
    with pytest.raises(ConfigError, match="--seq-len 64 is larger than the data allows"):
        TokenDataset(Corpus(resolve(str(tmp_path / "tiny.txt"))), 64, 0).check()


# -- optimizers --------------------------------------------------------------------------------
def test_lr_schedule_shape():
    lrs = [optim.lr_at(s, 1.0, warmup=10, total=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert optim.lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)


def test_adamw_matches_reference_formula():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4))
    params = {"w": p0.copy()}
    opt = optim.AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m = v = np.zeros_like(p0)
    ref = p0.copy()
    for t in range(1, 4):
        g = rng.normal(size=p0.shape)
        opt.step({"w": g}, lr=0.01)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        ref = ref * (1 - 0.01 * 0.1) - 0.01 * (m / (1 - 0.9**t)) / (
            np.sqrt(v / (1 - 0.95**t)) + 1e-8
        )
    np.testing.assert_allclose(params["w"], ref, rtol=1e-12)


def test_sgd_momentum_and_no_decay_on_vectors():
    params = {"b": np.ones(3)}
    opt = optim.SGD(params, momentum=0.5, weight_decay=0.1)
    opt.step({"b": np.ones(3)}, lr=0.1)
    opt.step({"b": np.ones(3)}, lr=0.1)
    np.testing.assert_allclose(params["b"], 1 - 0.1 - 0.1 * 1.5)  # vectors are not decayed


def test_clip_factor():
    assert optim.clip_factor(0.5, 1.0) == 1.0
    assert optim.clip_factor(4.0, 1.0) == pytest.approx(0.25)
    assert optim.clip_factor(4.0, 0.0) == 1.0
    assert math.isclose(4.0 * optim.clip_factor(4.0, 2.0), 2.0, rel_tol=1e-6)
