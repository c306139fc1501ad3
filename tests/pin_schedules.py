"""The golden schedules in tests/data/schedules.json, and the script that writes them.

    python -m tests.pin_schedules           # compare the builders with the file, list what differs
    python -m tests.pin_schedules --write   # rewrite the file after a deliberate change

`rows` holds the exact action list of every rank for small cases, one string per rank, as in a
timing diagram, and `lowered` the same with the sends and receives `lower` adds (where each
receive is posted decides how much a message overlaps compute). `table` holds, for larger
cases, each plan's simulated bubble and step time (unit costs, and F=1,B=2,W=1), its peak stash
per rank, and a digest of its rows, so that any other order (a different but valid ZB-V, say)
shows up even where the bubble does not move.
tests/test_schedule_pins.py compares the builders with the committed file; review the diff of
a rewrite like any other change of behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mpipipe.schedule import SCHEDULES, Costs, Plan, build, check, forward_only, lower

PATH = Path(__file__).parent / "data" / "schedules.json"
SKEWED = Costs(f=1, b=2, w=1)

# (schedule, pp, m, v): small enough to read; v None is the schedule's default
ROW_CASES: list[tuple[str, int, int, int | None]] = [
    ("gpipe", 2, 3, None),
    ("gpipe", 3, 2, None),
    ("1f1b", 3, 5, None),
    ("1f1b", 4, 2, None),
    ("interleaved", 2, 4, 2),
    ("interleaved", 2, 2, 3),
    ("interleaved", 3, 6, 2),
    ("zb-h1", 3, 5, None),
    ("zb-h1", 4, 4, None),
    ("zbv", 2, 2, None),
    ("zbv", 2, 4, None),
    ("zbv", 3, 3, None),
    ("zbv", 4, 5, None),
    ("forward:interleaved", 2, 4, 2),
    ("forward:zbv", 3, 3, None),
    ("v-half", 3, 4, None),
    ("v-min", 3, 4, None),
    ("dualpipev", 2, 4, None),
    ("dualpipev", 3, 7, None),
]
TABLE_PP = (2, 3, 4, 8)
TABLE_M = (1, 2, 3, 4, 5, 8, 12, 16, 32)


def plan_for(name: str, pp: int, m: int, v: int | None) -> Plan:
    """The named schedule; 'forward:NAME' is forward_only over NAME's layout."""
    if name.startswith("forward:"):
        return forward_only(build(name.split(":", 1)[1], pp, m, v))
    return build(name, pp, m, v)


def rows(plan: Plan) -> list[str]:
    return [" ".join(str(a) for a in row) for row in plan.actions]


def digest(plan: Plan) -> str:
    text = "\n".join(rows(plan)) + "\nstages " + repr(plan.stages)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_cases() -> list[tuple[str, int, int, int | None]]:
    cases: list[tuple[str, int, int, int | None]] = []
    for name, family in SCHEDULES.items():
        vs: tuple[int | None, ...] = family.chunks or (2, 3, 4)
        if family.chunks == (1,):
            vs = (None,)
        for v in vs:
            for pp in TABLE_PP:
                for m in TABLE_M:
                    if name == "interleaved" and m % pp or name == "dualpipev" and m < 2 * pp:
                        continue
                    cases.append((name, pp, m, v))
    return cases


def row_entry(name: str, pp: int, m: int, v: int | None) -> dict[str, Any]:
    plan = plan_for(name, pp, m, v)
    return {
        "schedule": name,
        "pp": pp,
        "m": m,
        "v": v,
        "stages": [list(s) for s in plan.stages],
        "rows": rows(plan),
        "lowered": rows(lower(plan)),
    }


def table_entry(name: str, pp: int, m: int, v: int | None) -> dict[str, Any]:
    plan = plan_for(name, pp, m, v)
    unit, skewed = check(plan), check(plan, SKEWED)
    return {
        "schedule": name,
        "pp": pp,
        "m": m,
        "v": v,
        "bubble": unit.bubble,
        "step": unit.step_time,
        "bubble_f1b2w1": skewed.bubble,
        "step_f1b2w1": skewed.step_time,
        "peak_stash": unit.peak_stash,
        "rows_sha256": digest(plan),
    }


def generate() -> dict[str, Any]:
    return {
        "about": "written by `python -m tests.pin_schedules --write`; see tests/pin_schedules.py",
        "rows": [row_entry(*c) for c in ROW_CASES],
        "table": [table_entry(*c) for c in table_cases()],
    }


def dumps(data: dict[str, Any]) -> str:
    """JSON with one case per line, so a diff shows which cases moved."""
    out = ["{", f'  "about": {json.dumps(data["about"])},']
    for key in ("rows", "table"):
        out.append(f'  "{key}": [')
        items = [json.dumps(e) for e in data[key]]
        out += [f"    {s}," for s in items[:-1]] + [f"    {items[-1]}"]
        out.append("  ]," if key == "rows" else "  ]")
    return "\n".join(out + ["}"]) + "\n"


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(PATH.read_text())
    return data


def key(e: dict[str, Any]) -> str:
    return f"{e['schedule']} pp={e['pp']} m={e['m']} v={e['v']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"rewrite {PATH.name}")
    args = p.parse_args(argv)
    fresh = generate()
    if args.write:
        PATH.parent.mkdir(parents=True, exist_ok=True)
        PATH.write_text(dumps(fresh))
        print(
            f"wrote {len(fresh['rows'])} row cases and {len(fresh['table'])} table rows to {PATH}"
        )
        return 0
    old = load()
    moved = [
        key(new)
        for part in ("rows", "table")
        for new, was in zip(fresh[part], old[part], strict=False)
        if new != was
    ]
    if len(fresh["table"]) != len(old["table"]) or len(fresh["rows"]) != len(old["rows"]):
        moved.append("the list of cases")
    print("\n".join(moved) if moved else f"{PATH.name} matches the builders")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
