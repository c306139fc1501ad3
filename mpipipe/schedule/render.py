"""Draw a simulated schedule: an ASCII timeline (one row per rank, one column per time slot) and,
with matplotlib installed, the same Gantt chart as a PNG."""

from __future__ import annotations

import math

from mpipipe.schedule.check import Report


def timeline(report: Report, max_columns: int = 400) -> str:
    """Each column is one slot (the shortest action's duration); an action shows its name in its
    first slot and '~' in the rest; '.' is idle. Zero-cost actions take no column."""
    spans = [s for row in report.spans for s in row if s[1] > s[0]]
    if not spans:
        return "(nothing to draw: every action costs 0)"
    slot = min(e - b for b, e, _ in spans)
    width = max(len(str(a)) for _, _, a in spans)
    n_cols = min(max_columns, math.ceil(report.step_time / slot - 1e-9))
    lines = []
    for r, row in enumerate(report.spans):
        cells = ["." * width] * n_cols
        for b, e, a in row:
            first, last = round(b / slot), round(e / slot)
            for col in range(first, min(last, n_cols)):
                cells[col] = (str(a) if col == first else "~" * width).ljust(width)
        lines.append(f"rank {r:>2} |" + " ".join(cells))
    if n_cols == max_columns:
        lines.append(f"(cut at {max_columns} slots)")
    return "\n".join(lines)


def summary(report: Report) -> str:
    idle = ", ".join(f"{x:g}" for x in report.idle)
    return (
        f"step time {report.step_time:g}, bubble {report.bubble:.3f}\n"
        f"idle per rank: [{idle}]\n"
        f"peak stashed activations per rank: {report.peak_stash}"
    )


COLORS = {"F": "#4c78a8", "B": "#f58518", "W": "#54a24b"}


def plot(report: Report, path: str) -> None:
    """Save the Gantt chart of `report` to `path` (PNG). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    pp = len(report.spans)
    fig, ax = plt.subplots(figsize=(max(6.0, report.step_time * 0.25), 0.45 * pp + 1.2))
    for r, row in enumerate(report.spans):
        for start, end, a in row:
            if end <= start:
                continue
            shade = 1.0 if a.chunk == 0 else 0.6
            ax.barh(
                r, end - start, left=start, color=COLORS[a.kind], alpha=shade, edgecolor="white"
            )
            mid = (start + end) / 2
            ax.text(mid, r, str(a), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    plan = report.plan
    ax.set_title(
        f"{plan.name}: pp={plan.pp}, m={plan.microbatches}, bubble {report.bubble:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
