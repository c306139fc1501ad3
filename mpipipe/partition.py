"""Which global layers each (virtual) stage owns: contiguous, body layers split as evenly as
possible, leading non-body layers (embedding) with the first stage, trailing ones (head) with the
last."""

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
