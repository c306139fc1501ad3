"""Which global layers each (virtual) stage owns: contiguous ranges of global layer indices.

- `uniform`: body layers (blocks) split as evenly as possible; the embedding rides with the first
  stage, the head with the last.
- `balanced`: the contiguous split that minimises the most expensive stage for given per-layer
  costs (parameter counts, or measured F+B+W times with the loss counted in the head), found
  exactly by dynamic programming; every stage keeps at least one body layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from mpipipe.errors import ConfigError


def uniform(body: Sequence[bool], n_stages: int, chunks: int = 1) -> list[range]:
    """Split layer indices 0..len(body)-1 into `n_stages` contiguous ranges.

    `body[i]` says whether layer i counts; every stage gets floor or ceil of (#body / n_stages)
    body layers, the earlier stages taking the remainder.
    """
    n_body = sum(body)
    if n_stages < 1:
        raise ConfigError(f"the number of stages must be at least 1, got {n_stages}")
    if n_stages > n_body:
        if chunks > 1:
            raise ConfigError(
                f"{n_stages} virtual stages (--pp {n_stages // chunks} x {chunks} chunks per "
                f"rank) but the model has only {n_body} layers (use --layers >= {n_stages}, "
                "or fewer stages)"
            )
        raise ConfigError(
            f"{n_stages} pipeline stages but the model has only {n_body} layers "
            f"(use --pp <= {n_body}, or --layers >= {n_stages})"
        )
    per, extra = divmod(n_body, n_stages)
    quota = [per + (1 if s < extra else 0) for s in range(n_stages)]
    body_idx = [i for i, b in enumerate(body) if b]
    bounds, taken = [], 0
    for q in quota:
        taken += q
        bounds.append(body_idx[taken - 1] + 1)  # stage ends after its last body layer
    bounds[-1] = len(body)  # trailing non-body layers join the last stage
    starts = [0] + bounds[:-1]
    return [range(a, b) for a, b in zip(starts, bounds, strict=True)]


def balanced(costs: Sequence[float], body: Sequence[bool], n_stages: int) -> list[range]:
    """The contiguous split of layers into `n_stages` ranges, each with >= 1 body layer, whose
    largest total cost is smallest (ties: the earliest such split)."""
    n = len(costs)
    uniform(body, n_stages)  # the same error when there are too few layers
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bodies = [0]
    for b in body:
        bodies.append(bodies[-1] + int(b))
    inf = float("inf")
    # best[k][j]: the smallest max-cost splitting layers [0, j) into k stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or bodies[j] - bodies[i] < 1:
                    continue
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][j]
        bounds.append(range(i, j))
        j = i
    return bounds[::-1]


METHODS = ("uniform", "params", "time")


def split(
    body: Sequence[bool],
    n_stages: int,
    chunks: int = 1,
    method: str = "uniform",
    costs: Sequence[float] | None = None,
) -> list[range]:
    """The layers of every virtual stage by `method`; `costs` per layer for params/time."""
    if method == "uniform" or costs is None:
        return uniform(body, n_stages, chunks)
    uniform(body, n_stages, chunks)  # the stages-vs-layers error, worded for chunks
    return balanced(costs, body, n_stages)
