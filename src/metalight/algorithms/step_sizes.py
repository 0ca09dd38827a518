"""Inner-loop step sizes learned in the outer loop (Meta-SGD's per-weight alpha, MAML++'s per-layer per-step LSLR)."""

from __future__ import annotations

from torch import Tensor, nn

from metalight.errors import ConfigError

# a learned step size starting outside this range makes the first inner steps do nothing or diverge
SANE_INIT = (0.0, 2.0)


class LearnedStepSizes(nn.Module):
    """One learned step-size tensor per adapted weight: shaped like the weight (steps=None) or one entry per inner step.

    They are meta-parameters: the outer optimizer updates them, DDP averages their gradients and the
    checkpoint holds them. Keys are the weights' names ('.' becomes '-', as ParameterDict wants).
    """

    def __init__(self, weights: dict[str, Tensor], init: float, steps: int | None = None, key: str = "algo.inner_lr") -> None:
        super().__init__()
        low, high = SANE_INIT
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not low < init <= high:
            raise ConfigError(
                f"{key}={init!r} is not a sane initial learned step size: use a number in ({low:g}, {high:g}], "
                f"e.g. {key}=0.01 (Meta-SGD starts in [0.005, 0.1], MAML++ at 0.1 on Omniglot and 0.01 on miniImageNet)."
            )
        self.names = list(weights)
        self.sizes = nn.ParameterDict(
            {
                name.replace(".", "-"): nn.Parameter(w.detach().new_full(w.shape if steps is None else (steps,), float(init)))
                for name, w in weights.items()
            }
        )

    def by_weight(self, detached: bool = False) -> dict[str, Tensor]:
        """Step sizes keyed by weight name, as make_task_fn takes them (detached for evaluation)."""
        sizes = {name: self.sizes[name.replace(".", "-")] for name in self.names}
        return {k: v.detach() for k, v in sizes.items()} if detached else sizes
