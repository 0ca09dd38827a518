"""Inner-loop step sizes learned in the outer loop (Meta-SGD's per-weight alpha, MAML++'s per-layer per-step LSLR)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalight.errors import ConfigError

# a learned step size starting outside this range makes the first inner steps do nothing or diverge
SANE_INIT = (0.0, 2.0)


def _check_sane(init: object, key: str) -> None:
    """ConfigError naming `key` unless `init` is a number in SANE_INIT's range."""
    low, high = SANE_INIT
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not low < init <= high:
        raise ConfigError(
            f"{key}={init!r} is not a sane initial learned step size: use a number in ({low:g}, {high:g}], "
            f"e.g. {key}=0.01 (Meta-SGD starts in [0.005, 0.1], MAML++ at 0.1 on Omniglot and 0.01 on miniImageNet)."
        )


class LearnedStepSizes(nn.Module):
    """One learned step-size tensor per adapted weight: shaped like the weight (steps=None) or one entry per inner step.

    They are meta-parameters: the outer optimizer updates them, DDP averages their gradients and the
    checkpoint holds them. Keys are the weights' names ('.' becomes '-', as ParameterDict wants).
    They start at `init`, or drawn uniformly from `init_range` = [low, high] (Meta-SGD's paper: [0.005, 0.1]).
    """

    def __init__(
        self, weights: dict[str, Tensor], init: float, steps: int | None = None, key: str = "algo.inner_lr", init_range: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        _check_sane(init, key)
        if init_range is not None:
            if len(init_range) != 2 or not init_range[0] < init_range[1]:
                raise ConfigError(f"algo.inner_lr_range={list(init_range)!r} is not valid: give [low, high] with low < high, e.g. [0.005, 0.1].")
            for bound in init_range:
                _check_sane(bound, "algo.inner_lr_range")
        self.names = list(weights)

        def initial(w: Tensor) -> Tensor:
            shape = w.shape if steps is None else (steps,)
            if init_range is None:
                return w.detach().new_full(shape, float(init))
            low, high = (float(bound) for bound in init_range)  # drawn from torch's global generator (seeded by the run)
            return torch.rand(shape, dtype=w.dtype, device=w.device) * (high - low) + low

        self.sizes = nn.ParameterDict({name.replace(".", "-"): nn.Parameter(initial(w)) for name, w in weights.items()})

    def by_weight(self, detached: bool = False) -> dict[str, Tensor]:
        """Step sizes keyed by weight name, as make_task_fn takes them (detached for evaluation)."""
        sizes = {name: self.sizes[name.replace(".", "-")] for name in self.names}
        return {k: v.detach() for k, v in sizes.items()} if detached else sizes
