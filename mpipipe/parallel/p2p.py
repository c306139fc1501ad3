"""Message tags between pipeline neighbours: deterministic, unique within a step, bounded.

The messages themselves travel through the rank's transport (parallel/transport.py).
"""

from __future__ import annotations

KINDS = {"A": 0, "G": 1}  # activation (forward), gradient (backward)


def tag(kind: str, mb: int, stage: int, n_stages: int, m: int) -> int:
    """Unique per (kind, micro-batch, receiving stage) within one step; < 2 * n_stages * m."""
    return (KINDS[kind] * n_stages + stage) * m + mb


def max_tag(n_stages: int, m: int) -> int:
    return 2 * n_stages * m - 1
