"""Lowering over every schedule: the messages are exactly the cross-rank dependencies, and no
receive buffer goes back to its pool before its last reader.

The dependency rule is written out here again, on purpose, rather than asked of
mpipipe/schedule/deps.py: F(mb) on virtual stage k reads the activation F(mb) made on k - 1,
B(mb) on k reads the gradient B(mb) made on k + 1. The messages of a lowered plan are derived
from this rule and compared with what `lower` emitted, so a pair of send and receive that goes
missing together (or a message nobody needs) fails, not only a send without its receive.
"""

from __future__ import annotations

from collections import Counter

import pytest

from mpipipe.parallel.p2p import max_tag, tag
from mpipipe.schedule import (
    SCHEDULES,
    Action,
    Plan,
    buffer_releases,
    build,
    forward_only,
    lower,
    message,
    recv_buffer_peaks,
    recv_buffer_slots,
)

RECV = {"F": "RA", "B": "RG"}
SEND = {"F": "SA", "B": "SG"}
PAYLOAD = {"F": "A", "B": "G"}


def cases() -> list[tuple[str, int, int, int | None]]:
    out: list[tuple[str, int, int, int | None]] = []
    for name, family in SCHEDULES.items():
        for v in family.chunks if family.chunks != (1,) else (None,):
            for pp in (2, 3, 4):
                for m in (1, 2, pp, 2 * pp + 1, 8):
                    if name == "dualpipev" and m < 2 * pp:
                        continue
                    if name != "interleaved" or m % pp == 0:
                        out.append((name, pp, m, v))
        if not family.chunks:
            out += [(name, 2, 4, 3), (name, 3, 6, 4)]
    return sorted(set(out), key=str)


CASES = cases()
IDS = [f"{n}-pp{p}-m{m}-v{v}" for n, p, m, v in CASES]


def plans(name: str, pp: int, m: int, v: int | None) -> list[Plan]:
    plan = build(name, pp, m, v)
    return [plan, forward_only(plan)]


def producer(kind: str, stage: int) -> int:
    """The virtual stage whose output `kind` on `stage` reads (the rule, restated)."""
    return stage - 1 if kind == "F" else stage + 1


def expected_messages(plan: Plan) -> dict[tuple[str, int, int], tuple[int, Action, int, Action]]:
    """{(payload, mb, consumer stage): (producer rank, producing action, consumer rank,
    consuming action)} for every dependency that crosses ranks."""
    out = {}
    for r, row in enumerate(plan.actions):
        for a in row:
            if a.kind not in RECV:
                continue
            k = plan.stages[r][a.chunk]
            src = producer(a.kind, k)
            if not 0 <= src < plan.n_stages:
                continue  # the pipeline's input, or the loss
            src_rank, src_chunk = plan.owner(src)
            if src_rank != r:
                made = Action(a.kind, a.mb, src_chunk)
                out[(PAYLOAD[a.kind], a.mb, k)] = (src_rank, made, r, a)
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_messages_are_exactly_the_cross_rank_dependencies(case):
    for plan in plans(*case):
        assert_messages(plan, lower(plan))


def test_a_missing_pair_or_an_extra_message_is_caught():
    """The check above, on a lowering with one send/receive pair dropped together, and on one
    with a needless pair added: both must fail."""
    plan = build("1f1b", 3, 4)
    low = lower(plan)
    pair = {Action("SA", 2), Action("RA", 2)}  # rank 0 -> rank 1, micro-batch 2
    dropped = [[a for a in row if r > 1 or a not in pair] for r, row in enumerate(low.actions)]
    with pytest.raises(AssertionError):
        assert_messages(plan, plan.with_actions(dropped))
    extra = [list(row) for row in low.actions]
    extra[0].append(Action("SG", 0))
    extra[1].insert(0, Action("RG", 0))
    with pytest.raises(AssertionError):
        assert_messages(plan, plan.with_actions(extra))


def assert_messages(plan: Plan, low: Plan) -> None:
    """`low` carries every cross-rank dependency of `plan` as one send and one receive."""
    n, m = plan.n_stages, plan.microbatches
    assert [[a for a in row if a.is_compute] for row in low.actions] == [
        list(row) for row in plan.actions
    ]
    expected = expected_messages(plan)
    comm = [(r, i, a) for r, row in enumerate(low.actions) for i, a in enumerate(row)]
    comm = [(r, i, a) for r, i, a in comm if not a.is_compute]
    assert len(comm) == 2 * len(expected)  # one send and one receive per dependency, no more
    tags = Counter()
    for key, (src_rank, made, dst_rank, use) in expected.items():
        send = Action(SEND[made.kind], made.mb, made.chunk)
        recv = Action(RECV[use.kind], use.mb, use.chunk)
        src_row, dst_row = low.actions[src_rank], low.actions[dst_rank]
        assert src_row.count(send) == 1, (key, send, src_rank)
        assert dst_row.count(recv) == 1, (key, recv, dst_rank)
        # sent after it is made, received (posted) before it is read
        assert src_row.index(send) > src_row.index(made), (key, src_rank)
        assert dst_row.index(recv) < dst_row.index(use), (key, dst_rank)
        # both ends agree on the mailbox key, name each other, and share one tag
        assert message(plan, src_rank, send) == (key, dst_rank)
        assert message(plan, dst_rank, recv) == (key, src_rank)
        t = tag(*key, n, m)
        assert 0 <= t <= max_tag(n, m)
        tags[t] += 1
    assert all(c == 1 for c in tags.values())  # unique within the step


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_receive_buffers_outlive_their_last_reader(case):
    """A received activation or gradient may be referenced by the saved context of its
    (micro-batch, chunk) until that pair's last compute action (W when there is one): the buffer
    goes back to its pool right after that action, not before, and not later."""
    for plan in plans(*case):
        for row in lower(plan).actions:
            releases = buffer_releases(row)
            released = Counter(j for recvs in releases.values() for j in recvs)
            recvs = [i for i, a in enumerate(row) if a.kind in ("RA", "RG")]
            assert sorted(released) == recvs and set(released.values()) <= {1}
            for at, given_back in releases.items():
                for i in given_back:
                    a = row[i]
                    readers = [
                        j
                        for j, b in enumerate(row)
                        if b.is_compute and (b.mb, b.chunk) == (a.mb, a.chunk)
                    ]
                    assert at == max(readers), (str(a), i, at, readers)
            assert recv_buffer_peaks(row) == live_peaks(row)
            # the fixed buffers the executor receives into: a buffer is taken again only after
            # the receive that held it gave it back, and each pool's buffers are all used
            slots, peaks = recv_buffer_slots(row), recv_buffer_peaks(row)
            given_at = {i: at for at, recvs in releases.items() for i in recvs}
            free_after: dict[tuple[str, int, int], int] = {}
            for i in recvs:
                a = row[i]
                held = (a.kind, a.chunk, slots[i])
                assert free_after.get(held, -1) < i, (str(a), i, held)
                free_after[held] = given_at[i]
            used: dict[tuple[str, int], set[int]] = {}
            for i in recvs:
                used.setdefault((row[i].kind, row[i].chunk), set()).add(slots[i])
            assert {k: len(v) for k, v in used.items()} == peaks
            assert all(v == set(range(len(v))) for v in used.values())


def live_peaks(row: tuple[Action, ...]) -> dict[tuple[str, int], int]:
    """Most receive buffers held at once per (kind, chunk), counting each from its receive to
    the last compute action of its (micro-batch, chunk), inclusive."""
    last = {}
    for j, b in enumerate(row):
        if b.is_compute:
            last[(b.mb, b.chunk)] = j
    peaks: dict[tuple[str, int], int] = {}
    for i, a in enumerate(row):
        if a.kind not in ("RA", "RG"):
            continue
        key = (a.kind, a.chunk)
        held = sum(
            1
            for j, b in enumerate(row[: i + 1])
            if (b.kind, b.chunk) == key and last[(b.mb, b.chunk)] >= i
        )
        peaks[key] = max(peaks.get(key, 0), held)
    return peaks


def test_deferred_w_keeps_buffers_taken_until_w():
    """Where W trails B (ZB-H1's later stages, ZB-V) the received inputs stay taken until W, so
    the pools the executor allocates (exactly these numbers) are larger than 1F1B's."""
    peaks = {n: [recv_buffer_peaks(r) for r in lower(build(n, 4, 8)).actions] for n in SCHEDULES}
    assert peaks["1f1b"][3] == {("RA", 0): 2}
    assert peaks["zb-h1"][3] == {("RA", 0): 5}
    assert peaks["zb-h1"][1] == {("RA", 0): 5, ("RG", 0): 3}
    assert peaks["zbv"][1] == {("RA", 0): 6, ("RA", 1): 4, ("RG", 0): 2, ("RG", 1): 3}
    assert peaks["zbv"][3] == {("RA", 0): 5, ("RG", 1): 4}
