"""Configuration refused at validation: hyperparameters out of range, TOML choices checked like
flags, TOML files that are empty, garbage or mix the top level with [train]. Pure units."""

from __future__ import annotations

import pytest

from mpipipe.config import TrainConfig, build, load_toml
from mpipipe.errors import ConfigError

OUT_OF_RANGE = {
    "lr": [(-1.0, "--lr -1 must be a positive finite number (e.g. 3e-4)"), (0.0, "--lr 0 must"),
           (float("nan"), "--lr nan must"), (float("inf"), "--lr inf must")],
    "warmup": [(-1, "--warmup -1 must be an integer >= 0")],
    "min_lr_ratio": [(1.5, "--min-lr-ratio 1.5 must be a number in [0, 1]"),
                     (-0.1, "--min-lr-ratio -0.1 must")],
    "weight_decay": [(-0.1, "--weight-decay -0.1 must be a finite number >= 0")],
    "loss_scale": [(0.0, "--loss-scale 0 must be a positive finite number"),
                   (-2.0, "--loss-scale -2 must")],
    "clip": [(-1.0, "--clip -1 must be a finite number >= 0"), (float("nan"), "--clip nan must")],
    "momentum": [(1.0, "--momentum 1 must be a number in [0, 1)")],
    "seed": [(-1, "--seed -1 must be an integer >= 0")],
    "bucket_mb": [(0.0, "--bucket-mb 0 must be a positive finite number")],
    "timeout_s": [(-5.0, "--timeout-s -5 must be a finite number >= 0")],
    "save_every": [(-1, "--save-every -1 must be an integer >= 0")],
}  # fmt: skip


@pytest.mark.parametrize(
    "name, value, message",
    [(name, v, m) for name, cases in OUT_OF_RANGE.items() for v, m in cases],
)
def test_hyperparameters_out_of_range_are_refused(name, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{name: value}).validate()
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"zero": 2}, r"--zero 2: choose 0 \(off\) or 1"),
        ({"model": "mlp", "tie_embeddings": "yes"}, "--tie-embeddings yes needs a GPT model"),
        ({"tie_embeddings": "true"}, "--tie-embeddings 'true' is not one of: no, yes"),
    ],
)
def test_zero_and_tied_embeddings_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields).validate()


def test_edges_of_the_ranges_are_accepted():
    TrainConfig(
        warmup=0, min_lr_ratio=0.0, weight_decay=0.0, clip=0.0, momentum=0.0, seed=0
    ).validate()
    TrainConfig(min_lr_ratio=1.0, lr=1e-9, loss_scale=1.0).validate()


def test_a_choice_is_checked_alike_from_the_api_and_from_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"--recompute 'ful' is not one of: none, full, sel"):
        TrainConfig(recompute="ful").validate()
    f = tmp_path / "run.toml"
    f.write_text('[train]\nrecompute = "ful"\n')
    with pytest.raises(ConfigError) as e:
        load_toml(str(f))
    assert str(e.value) == (
        f"--config {f}: recompute = 'ful' is not one of: none, full, selective"
    )
    f.write_text('dtype = "fp8"\n')
    with pytest.raises(ConfigError, match=r"dtype = 'fp8' is not one of: float32, float64"):
        load_toml(str(f))


def test_toml_top_level_keys_and_a_train_table_do_not_mix(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("steps = 9\nlr = 0.1\n[train]\nd-model = 64\n")
    with pytest.raises(ConfigError) as e:
        load_toml(str(f))
    assert "keys at the top level (lr, steps) and under [train]" in str(e.value)
    f.write_text("steps = 9\nd-model = 64\n")
    assert load_toml(str(f)) == {"steps": 9, "d_model": 64}
    f.write_text("[train]\nsteps = 9\nd-model = 64\n")
    assert build({"steps": 3}, str(f)).steps == 3  # flags win over the file


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no keys (an empty file?)"),
        (b"# only a comment\n", "holds no keys"),
        (b"layers = 4\nd-model = ", "not valid TOML"),  # truncated
        (b"\x89HDF\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text (a binary file?)"),
        (b'[optim]\nname = "adamw"\n', "unknown key 'optim'"),  # another version's layout
        (b"train = 3\n", "train must be a [train] table"),
        (b"d_model = 64\nd-model = 32\n", "d-model is given twice"),
        (b"layers = [4]\n", "layers = [4] is not a valid int"),
        (b"lr = true\n", "lr = True is not a valid float"),
    ],
    ids=["empty", "comments", "truncated", "binary", "other-version", "train-value", "twice",
         "array", "bool"],
)  # fmt: skip
def test_broken_config_files_get_one_line(tmp_path, content, message):
    f = tmp_path / "run.toml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_toml(str(f))
    text = str(e.value)
    assert text.startswith(f"--config {f}: ") and message in text and "\n" not in text, text


def test_missing_config_file_and_a_directory(tmp_path):
    for path in (tmp_path / "none.toml", tmp_path):
        with pytest.raises(ConfigError, match="no such file"):
            load_toml(str(path))
