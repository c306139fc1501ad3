"""Every schedule builder pinned against tests/data/schedules.json: exact rows for small cases,
bubble, step time, peak stash and a digest of the rows for larger ones.

A builder that changes its order (even to another valid one, with the same results bitwise) fails
here. If the change is deliberate, rewrite the file with `python -m tests.pin_schedules --write`
and review its diff.
"""

from __future__ import annotations

import pytest

from mpipipe.schedule import SCHEDULES, lower
from tests import pin_schedules as pins

GOLDEN = pins.load()
REGENERATE = "deliberate? python -m tests.pin_schedules --write, and review the diff"


def test_every_named_schedule_and_its_chunk_counts_are_pinned():
    in_rows = {e["schedule"] for e in GOLDEN["rows"]}
    in_table = {(e["schedule"], e["v"]) for e in GOLDEN["table"]}
    for name, family in SCHEDULES.items():
        assert name in in_rows, name
        for v in family.chunks if family.chunks != (1,) else (None,):
            assert (name, v) in in_table, (name, v)
        if not family.chunks:
            assert {v for n, v in in_table if n == name} >= {2, 3, 4}
    assert [pins.key(e) for e in GOLDEN["table"]] == [
        pins.key({"schedule": n, "pp": p, "m": m, "v": v}) for n, p, m, v in pins.table_cases()
    ]


@pytest.mark.parametrize("case", GOLDEN["rows"], ids=pins.key)
def test_exact_rows(case):
    plan = pins.plan_for(case["schedule"], case["pp"], case["m"], case["v"])
    assert [list(s) for s in plan.stages] == case["stages"]
    assert pins.rows(plan) == case["rows"], REGENERATE
    assert pins.rows(lower(plan)) == case["lowered"], REGENERATE


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_bubble_peak_stash_and_order_table(name):
    cases = [e for e in GOLDEN["table"] if e["schedule"] == name]
    assert len(cases) >= (16 if name == "dualpipev" else 20)  # dualpipev needs m >= 2 pp
    for want in cases:
        got = pins.table_entry(want["schedule"], want["pp"], want["m"], want["v"])
        where = f"{pins.key(want)} ({REGENERATE})"
        assert got["peak_stash"] == want["peak_stash"], where
        assert got["step"] == want["step"] and got["step_f1b2w1"] == want["step_f1b2w1"], where
        assert got["bubble"] == pytest.approx(want["bubble"], rel=1e-12, abs=1e-15), where
        assert got["bubble_f1b2w1"] == pytest.approx(want["bubble_f1b2w1"], rel=1e-12), where
        assert got["rows_sha256"] == want["rows_sha256"], where


def test_the_file_is_what_the_script_writes():
    """The committed file is the script's formatting of its own cases (no hand edits)."""
    assert pins.dumps(GOLDEN) == pins.PATH.read_text()


def test_a_different_valid_zbv_order_is_caught():
    """Swap two W passes of different chunks on one rank of ZB-V: still valid, still bitwise
    (W order per chunk is unchanged), and the pins must see it."""
    from mpipipe.schedule import check

    plan = pins.plan_for("zbv", 4, 8, None)
    row = list(plan.actions[0])
    i = next(
        j
        for j in range(len(row) - 1)
        if row[j].kind == row[j + 1].kind == "W" and row[j].chunk != row[j + 1].chunk
    )
    row[i], row[i + 1] = row[i + 1], row[i]
    other = plan.with_actions([row, *plan.actions[1:]])
    check(other)  # valid
    want = next(e for e in GOLDEN["table"] if pins.key(e) == "zbv pp=4 m=8 v=2")
    assert pins.digest(other) != want["rows_sha256"]
