"""pp x dp x tp: the same global batch gives the single-process result, for every schedule.

Tensor parallelism sums a row-parallel product over the group in another order than one
process does (and the cross-entropy's normaliser likewise), so equality is to rounding
(relative 1e-12 in float64, SGD: see test_data_parallel.py), not bitwise. Three launches cover
it all (4, 8 and 1 rank), each running several layouts; a checkpoint saved in one launch is
resumed at another tp in the next (tp 2 -> tp 4, tp 2 x dp 2 -> one process), and within the
8-rank launch between pp 2 x tp 2 x dp 2 with ZeRO-1 and pp 4 x tp 1 x dp 2 without, both ways,
with tied embeddings (the reference: a tied single process). zbv's rank 0 holds the embedding
and the head (one shared array); 1f1b's first and last ranks each hold a copy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import mpirun
from tests.test_data_parallel import assert_matches

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1", "zbv"]
FOUR = [  # on 4 ranks
    *(f"pp=2,tp=2,schedule={s}" for s in SCHEDULES),
    "pp=1,tp=2,dp=2",
    "pp=1,tp=4",
    "pp=2,tp=2,recompute=full",  # the forward's all-reduces run again inside B
]
EIGHT = [  # on 8 ranks
    "pp=2,tp=2,dp=2,schedule=1f1b",
    "pp=2,tp=2,dp=2,schedule=zbv",
    "pp=2,tp=4",
    "pp=1,tp=4,dp=2",
]
TIED = "pp=1,tie_embeddings=yes"  # the reference of the tied layouts
ZERO_TP = "pp=2,tp=2,dp=2,zero=1,schedule=zbv,tie_embeddings=yes"  # also save at step 2
PP4 = "pp=4,tie_embeddings=yes"  # 8 ranks: dp 2; also save at step 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    a, b = tmp / "ckpt_tp2", tmp / "ckpt_tp2dp2"
    save_a, resume_a = f"pp=2,tp=2,steps=2,checkpoint_dir={a}", f"pp=2,tp=4,resume={a}"
    save_b, resume_b = f"pp=2,tp=2,dp=2,steps=2,checkpoint_dir={b}", f"pp=1,resume={b}"
    c, d = tmp / "ckpt_zero_tp", tmp / "ckpt_pp4"
    zero_tp, pp4 = (
        f"{ZERO_TP},save_every=2,checkpoint_dir={c}",
        f"{PP4},save_every=2,checkpoint_dir={d}",
    )
    resume_c, resume_d = (
        f"{PP4},resume={c}/step_000002",
        f"pp=2,tp=2,dp=2,zero=1,tie_embeddings=yes,resume={d}/step_000002",
    )
    four = mpirun.layouts(tmp / "four.npz", [*FOUR, save_a], 4)
    eight = mpirun.layouts(
        tmp / "eight.npz", [*EIGHT, resume_a, save_b, zero_tp, pp4, resume_c, resume_d], 8
    )
    ref = mpirun.layouts(tmp / "ref.npz", ["pp=1", resume_b, TIED], 1)
    eight.update({k.replace(zero_tp, ZERO_TP).replace(pp4, PP4): v for k, v in eight.items()})
    resumed = [(resume_a, "pp=1"), (resume_b, "pp=1"), (resume_c, TIED), (resume_d, TIED)]
    return {"ref": ref, "got": {**four, **eight}, "resumed": resumed, "tied_ckpt": d}


@pytest.mark.openmpi  # the tp all-reduces (SUM and MAX) beside p2p and the dp buckets
@pytest.mark.parametrize("layout", [*FOUR, *EIGHT, ZERO_TP, PP4])
def test_tp_grid_equals_single_process(runs, layout):
    assert_matches(runs["ref"], TIED if "tie" in layout else "pp=1", runs["got"], layout)


def test_tied_weight_is_stored_once(runs):
    """A tied checkpoint holds the embedding (and its momentum) and no head weight: the head's
    copy on the last stage is not written, and is filled from the embedding on load."""
    manifest = json.loads((runs["tied_ckpt"] / "step_000002" / "manifest.json").read_text())
    tensors = [t for shard in manifest["shards"] for t in shard["tensors"]]
    assert not [t for t in tensors if "lm_head" in t]
    assert len([t for t in tensors if t.endswith("/wte")]) == 2  # the weight, its momentum


@pytest.mark.parametrize(
    "which",
    [0, 1, 2, 3],
    ids=["tp2-to-tp4", "tp2dp2-to-tp1", "pp2tp2dp2zero1-to-pp4", "pp4-to-pp2tp2dp2zero1"],
)
def test_checkpoint_resumes_at_another_tp(runs, which):
    """Saved whole after 2 steps at one layout, resumed at another for step 3: the parameters
    and the step's loss are those of 3 uninterrupted steps in one process (with ZeRO-1 the
    momentum is saved from the replicas' pieces and cut into other pieces on load)."""
    layout, base = runs["resumed"][which]
    got = {**runs["got"], **runs["ref"]}
    ref = runs["ref"]
    names = [k[len(base) + 1 :] for k in ref if k.startswith(f"{base}/layers.")]
    assert len(names) > 20
    for name in names:
        a, b = got[f"{layout}/{name}"], ref[f"{base}/{name}"]
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-12, f"{layout}: {name}: relative difference {rel:.3g}"
    loss = got[f"{layout}/loss"]
    assert len(loss) == 1 and abs(loss[0] - ref[f"{base}/loss"][-1]) < 1e-12 * abs(loss[0])


@pytest.mark.parametrize("layout, tp", [("pp=1,tp=2,dp=2", 2), ("pp=1,tp=4", 4)])
def test_parameter_bytes_scale_as_one_over_tp(runs, layout, tp):
    """The fullest rank holds ~1/tp of the parameters (LayerNorms, the position embedding and
    the row-parallel biases are replicated: a few per cent here), within 10%."""
    whole = float(runs["ref"]["bytes/pp=1"])
    ratio = float(runs["got"][f"bytes/{layout}"]) / whole
    assert abs(ratio * tp - 1) < 0.1, ratio
