"""The V-shape family: two chunks per rank in a V (rank r runs stages r and 2 pp - 1 - r, as
ZB-V does), so the first and last stages share rank 0 and the tip of the V hands over locally.

- V-Half and V-Min (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024)
  trade bubble for activation memory: about 1/2 and 1/3 of 1F1B's peak of min(pp, m)
  micro-batches. The paper builds them by repeating a hand-made building block; ours are the
  list scheduler (listsched.py) run under the same caps, min(pp, m) and ceil(2 min(pp, m) / 3)
  chunk-activations (half a micro-batch each), with unit costs. The checker reports the peak.
- DualPipeV (DeepSeek-V3's DualPipe cut in half): the eight phases of DeepSeek's reference
  schedule, with its zero-bubble W deferral. DualPipe overlaps the F of one micro-batch with
  the B of another on the same device; our runtime runs one action at a time per rank, so each
  overlapped pair becomes "F, then B" in the list. Needs m >= 2 pp.
"""

from __future__ import annotations

import math

from mpipipe.errors import ConfigError
from mpipipe.schedule.actions import Action, B, F, Plan, W
from mpipipe.schedule.listsched import list_schedule, v_stages


def v_half(pp: int, m: int) -> Plan:
    return list_schedule("v-half", m, v_stages(pp), limit=max(2, min(pp, m)))


def v_min(pp: int, m: int) -> Plan:
    return list_schedule("v-min", m, v_stages(pp), limit=max(2, math.ceil(2 * min(pp, m) / 3)))


def dualpipev(pp: int, m: int) -> Plan:
    if m < 2 * pp:
        raise ConfigError(
            f"dualpipev needs --microbatches at least 2 x --pp: {m} < {2 * pp} "
            f"(use --microbatches {2 * pp} or more, or another schedule)"
        )
    return Plan("dualpipev", m, v_stages(pp), tuple(_dualpipev_rank(pp, m, r) for r in range(pp)))


def _dualpipev_rank(pp: int, m: int, r: int) -> tuple[Action, ...]:
    row: list[Action] = []
    f, b = [0, 0], [0, 0]  # next micro-batch per chunk
    deferred: list[Action] = []  # zero-bubble W passes, first in first out

    def fwd(c: int) -> None:
        row.append(F(f[c], c))
        f[c] += 1

    def bwd(c: int, zb: bool = False) -> None:
        row.append(B(b[c], c))
        (deferred if zb else row).append(W(b[c], c))
        b[c] += 1

    def weight() -> None:
        row.append(deferred.pop(0))

    for _ in range((pp - r - 1) * 2):  # 1: forwards on chunk 0
        fwd(0)
    for _ in range(r + 1):  # 2: F0 F1
        fwd(0)
        fwd(1)
    for _ in range(pp - r - 1):  # 3: B1 W F1 (zero bubble)
        bwd(1, zb=True)
        weight()
        fwd(1)
    for _ in range(m - 2 * pp + r + 1):  # 4: F0&B1, F1&B0 (the overlapped pairs, in order)
        fwd(0)
        bwd(1)
        fwd(1)
        bwd(0)
    for _ in range(pp - r - 1):  # 5: B1, F1&B0
        bwd(1)
        fwd(1)
        bwd(0)
    zb = False
    for i in range(r + 1):  # 6: B1 B0, the second half deferring W
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        bwd(1, zb)
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        bwd(0, zb)
    for _ in range(pp - r - 1):  # 7: W B0
        weight()
        bwd(0, zb=True)
    while deferred:  # 8: the remaining W passes
        weight()
    return tuple(row)
