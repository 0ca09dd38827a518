"""Meta-SGD (Li et al. 2017): MAML with a learned step size for every weight, meta-learned with the weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from metalight.algorithms.optimization.maml import MAML
from metalight.algorithms.optimization.step_sizes import LearnedStepSizes


class MetaSGD(MAML):
    """Meta-SGD: each inner step is w - alpha * grad, alpha a tensor shaped like w (learned; saved in the checkpoint).

    alpha starts at `inner_lr` everywhere, or drawn uniformly from `inner_lr_range` = [low, high] as in
    the paper ([0.005, 0.1]), and is updated by the outer optimizer together with the weights. The paper adapts with one inner step (inner_steps=1); evaluation repeats the learned
    step eval_inner_steps times. All other options are MAML's.
    """

    def __init__(self, model: nn.Module, inner_lr_range: Sequence[float] | None = None, **maml_options: Any) -> None:
        # a plain list before MAML saves the hyper-parameters (a ListConfig cannot be loaded with weights_only=True)
        inner_lr_range = None if inner_lr_range is None else [float(bound) for bound in inner_lr_range]
        super().__init__(model, **maml_options)
        init_range = inner_lr_range
        adapted = {k: v for k, v in model.named_parameters() if k in self.adapted_weights}  # no sizes for a kept-out table
        self.step_sizes = LearnedStepSizes(adapted, self.hparams.inner_lr, init_range=init_range)
        self.train_loop = dataclasses.replace(self.train_loop, learned_lr="per_parameter")
        self.eval_loop = dataclasses.replace(self.eval_loop, learned_lr="per_parameter")

    def inner_options(self, training: bool) -> dict[str, Any]:
        """MAML's adapted weights with their learned step sizes (with their graph while training)."""
        return super().inner_options(training) | {"step_sizes": self.step_sizes.by_weight(detached=not training)}
