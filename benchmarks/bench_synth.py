"""The synthesizer against every named schedule that fits the same memory cap, in simulation.

Cases (issue 17): P in {4, 8, 16}; M in {P, 2P, 4P}; F:B:W of 1:1:1, 1:2:1, 1:2:2; latency 0
and 10% of F; uniform stages, and the first and last 1.5x heavier; caps K of P/2, 3P/4 and P
micro-batches (min(P, M) = P here). Costs are per rank's share of the model (a chunk of a
2-chunk schedule costs half). Gain = the best fitting named schedule's step / synth's step; a
case with no named schedule under K counts as a win with no gain figure. Pure simulation, so
the figures do not depend on the machine's load (only the run time does).

    python benchmarks/bench_synth.py [--pp 4,8,16] [--full]
"""

from __future__ import annotations

import argparse
import math
import time
from statistics import mean

from mpipipe.schedule import SCHEDULES, Costs, build
from mpipipe.schedule.synth import Row, evaluate, memory, synthesize

_HEAD = (
    "| P | M | cases | synth strictly faster | grown by the list scheduler | mean gain | least |"
)
RATIOS = {"1:1:1": (1.0, 1.0, 1.0), "1:2:1": (1.0, 2.0, 1.0), "1:2:2": (1.0, 2.0, 2.0)}


def costs_for(pp: int, fbw: tuple[float, float, float], latency: float, skew: bool) -> Costs:
    weight = [1.5 if skew and s in (0, pp - 1) else 1.0 for s in range(pp)]
    f, b, w = ([x * s for s in weight] for x in fbw)
    return Costs(f, b, w, latency * fbw[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", default="4,8,16")
    p.add_argument("--ms", default="1,2,4", help="micro-batches as multiples of P")
    p.add_argument("--full", action="store_true", help="print every case, not just the summary")
    args = p.parse_args()
    t0 = time.perf_counter()
    summary: list[tuple[int, int, int, int, int, list[float]]] = []
    never_slower = True
    for pp in map(int, args.pp.split(",")):
        for m in (k * pp for k in map(int, args.ms.split(","))):
            plans = []
            for name in sorted(SCHEDULES):
                try:
                    plans.append((name, build(name, pp, m)))
                except Exception:  # noqa: BLE001 - a schedule that refuses (pp, m) is skipped
                    continue
            cases = wins = grown = 0
            gains: list[float] = []
            for ratio, fbw in RATIOS.items():
                for latency in (0.0, 0.1):
                    for skew in (False, True):
                        costs = costs_for(pp, fbw, latency, skew)
                        rows = [Row(n, evaluate(plan, costs)) for n, plan in plans]
                        for cap in sorted({math.ceil(pp / 2), math.ceil(3 * pp / 4), pp}):
                            fit = [r for r in rows if r.memory <= cap + 1e-9]
                            res = synthesize(pp, m, cap, costs, [r.report.plan for r in fit])
                            step = res.report.step_time
                            assert memory(res.report) <= cap + 1e-9
                            best = min((r.report.step_time for r in fit), default=math.inf)
                            cases += 1
                            never_slower &= step <= best + 1e-9
                            wins += step < best - 1e-9
                            grown += res.origin.startswith("list")
                            if fit:
                                gains.append(best / step)
                            if args.full:
                                named = (
                                    min(fit, key=lambda r: r.report.step_time).name if fit else "-"
                                )
                                print(
                                    f"P={pp} M={m} {ratio} lat={latency:g}F "
                                    f"{'skew' if skew else 'flat'} K={cap}: synth {step:.4g} "
                                    f"({res.origin}), best named {named} {best:.4g}"
                                )
            summary.append((pp, m, cases, wins, grown, gains))
            print(
                f"P={pp} M={m}: {cases} cases, {wins} strictly faster, {len(gains)} with a named "
                f"schedule under the cap, done at {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print()
    print(_HEAD)
    print(
        "|---|---|-------|-----------------------|-------------------------|-----------|------------|"
    )
    all_gains: list[float] = []
    total = total_wins = total_grown = 0
    for pp, m, cases, wins, grown, gains in summary:
        all_gains += gains
        total += cases
        total_wins += wins
        total_grown += grown
        print(
            f"| {pp} | {m} | {cases} | {wins} | {grown} | {mean(gains) if gains else 1:.3f}x | "
            f"{min(gains) if gains else 1:.3f}x |"
        )
    print(
        f"| all | | {total} | {total_wins} | {total_grown} | {mean(all_gains):.3f}x | "
        f"{min(all_gains):.3f}x |"
    )
    print(f"never slower than a fitting named schedule: {'yes' if never_slower else 'NO'}")
    print(
        f"summary: synthesizer | mean gain over the best named schedule under the cap | "
        f"{mean(all_gains):.3f}x | >= 1 in every case ({total} cases, {total_wins} strict wins)"
    )
    return 0 if never_slower else 1


if __name__ == "__main__":
    raise SystemExit(main())
