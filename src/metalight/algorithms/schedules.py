"""LR schedules the configs name that torch has no class for (used through torch's LambdaLR)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from metalight.errors import ConfigError


class PiecewiseFactor:
    """LambdaLR factor: factors[0] before boundaries[0], factors[i] from step boundaries[i - 1] on (MetaOptNet's schedule)."""

    def __init__(self, boundaries: Sequence[int], factors: Sequence[float]) -> None:
        if len(factors) != len(boundaries) + 1 or list(boundaries) != sorted(boundaries):
            raise ConfigError(
                f"scheduler boundaries={list(boundaries)} / factors={list(factors)}: give increasing boundaries and one "
                "factor more than boundaries (the factor before the first, then after each)."
            )
        self.boundaries, self.factors = list(boundaries), [float(f) for f in factors]

    def __call__(self, step: int) -> float:
        return self.factors[bisect_right(self.boundaries, step)]
