"""MAML and first-order MAML (Finn et al. 2017): inner SGD on the support set, meta-gradient of the query loss.

MAML is also the base of the gradient-based family built on it (ANIL, Meta-SGD, MAML++): they change
what the inner loop adapts and with which step sizes (`inner_options`), the order of the meta-gradient
over training (`current_train_loop`) and the outer loss (`loss_weights`); the meta-step is this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule, OptimizerFactory, SchedulerFactory
from metalight.algorithms.optimization.functional import InnerLoop, TaskOutcome, inner_weights, make_task_fn, split_state


class MAML(EpisodicModule):
    """Model-agnostic meta-learning; first_order=True is FOMAML (inner gradients treated as constants).

    Each task takes `inner_steps` SGD steps of size `inner_lr` on its whole support set; the outer
    loss is the mean query loss over the meta-batch (cross-entropy, or the task kind's: MSE for regression). Second order, the meta-gradient goes
    through the inner steps exactly. Validation and test adapt with `eval_inner_steps` steps of
    `eval_inner_lr` (default: inner_lr). The outer optimizer defaults to Adam(lr=1e-3).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        first_order: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        eval_inner_lr: float | None = None,
        transductive: bool = True,
    ) -> None:
        super().__init__(model, optimizer, scheduler, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        # the model and the optimizer/scheduler factories stay out of the checkpoint's hyper-parameters:
        # the run's Hydra config records them, and plain values keep checkpoints loadable with weights_only=True
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.train_loop = InnerLoop(steps=inner_steps, lr=inner_lr, first_order=first_order)
        self.eval_loop = InnerLoop(steps=eval_inner_steps, lr=inner_lr if eval_inner_lr is None else eval_inner_lr)
        # every trainable weight but those the model keeps out of inner loops (a text encoder's token table)
        self.adapted_weights = inner_weights(model)

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Adapt `adapted_weights`; the other trainable weights stay at their meta-values and still get meta-gradients."""
        return {"adapted": self.adapted_weights}

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-3), the paper's outer optimizer."""
        return torch.optim.Adam(params, lr=1e-3)

    def current_train_loop(self) -> InnerLoop:
        """The inner loop of this meta-step (MAML++ anneals its derivative order over epochs)."""
        return self.train_loop

    def loss_weights(self) -> Sequence[float] | None:
        """Per-step weights of the query loss (MAML++'s multi-step loss), or None for the last step's loss alone."""
        return None

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Adapt all tasks from the meta-parameters and backpropagate the mean query loss (DDP averages it)."""
        params, fixed = split_state(self.model)
        loop = self.current_train_loop()
        options = self.inner_options(training=True)
        task_fn = make_task_fn(
            self.model, fixed, loop, self.path(), record="ends" if measure else "last", loss_weights=self.loss_weights(), kind=self.task_kind, **options
        )
        return self.meta_backward(task_fn, params, batch, second_order=not loop.first_order, extra=options.get("step_sizes"))
