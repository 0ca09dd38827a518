"""MAML++ (Antoniou et al. 2019, "How to train your MAML"): MAML with six fixes, each one a config switch.

Details the paper leaves open follow the authors' code (antreasantoniou/HowToTrainYourMAMLPytorch):
the multi-step loss weights (`msl_weights`), which weights the inner loop adapts (all but the
BatchNorm ones), the per-step BatchNorm tables indexed by the inner step (support forward at step k
and query forward after step k both use row k), and learned step sizes starting at inner_lr. Where we
differ, and why:
* CA anneals the outer LR per meta-step over trainer.max_steps (the authors step it once per epoch);
* BNRS folds the mean batch statistics of all tasks of all ranks into the running statistics once per
  meta-step (the authors update them task by task, so they would differ between DDP ranks), and with
  transductive=false evaluation normalizes with them; with transductive=true it uses batch
  statistics, as the authors' code always does;
* evaluation may take more inner steps than training: its extra steps reuse the last trained row of the
  per-step BatchNorm tables and the last learned step size (the authors' tables have one row per training
  step and evaluate with as many steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalight.algorithms.base import OptimizerFactory, SchedulerFactory
from metalight.algorithms.optimization.functional import InnerLoop, TaskOutcome, split_state
from metalight.algorithms.optimization.maml import MAML
from metalight.algorithms.optimization.step_sizes import LearnedStepSizes
from metalight.errors import ConfigError
from metalight.models.step_norm import StepBatchNorm2d, use_step_batch_norm

NORMALIZATION = (StepBatchNorm2d, nn.modules.batchnorm._NormBase)


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The authors' weights of the query losses after inner steps 1..steps at `epoch` (they sum to 1).

    Uniform at epoch 0; each earlier step loses 1/steps/msl_epochs per epoch, down to 0.03/steps, and the
    last step gains what they lose, so that by epoch msl_epochs the last step weighs 1 - 0.03 (steps - 1)/steps.
    """
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    earlier = [max(1.0 / steps - epoch * decay, floor)] * (steps - 1)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return earlier + [last]


class MAMLpp(MAML):
    """MAML++: MAML plus MSL, DA, BNRS, BNWB, LSLR and CA, each switched on or off by its flag.

    * msl: the outer loss weighs the query loss after every inner step (`msl_weights`), for the
      first `msl_epochs` epochs; afterwards only the last step's.
    * da: derivative-order annealing: first-order meta-gradients for the first `da_epochs` epochs,
      second order afterwards (unless first_order=True throughout).
    * bnrs: per-step BatchNorm running statistics; bnwb: per-step BatchNorm weights and biases. Either
      replaces the model's BatchNorm2d layers by StepBatchNorm2d; BatchNorm weights are meta-learned
      only, never adapted in the inner loop (as in the authors' configs).
    * lslr: a learned step size per adapted weight tensor and per inner step, starting at inner_lr.
    * ca: cosine annealing of the outer LR from its initial value to `min_lr` over trainer.max_steps.
    An epoch is data.batches_per_epoch meta-steps.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int = 5,
        first_order: bool = False,
        msl: bool = True,
        msl_epochs: int = 10,
        da: bool = False,
        da_epochs: int = 50,
        bnrs: bool = True,
        bnwb: bool = True,
        lslr: bool = True,
        ca: bool = True,
        min_lr: float = 1e-5,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        eval_inner_lr: float | None = None,
        transductive: bool = True,
    ) -> None:
        for key, value in (("msl_epochs", msl_epochs), ("da_epochs", da_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"algo.{key}={value!r} is not valid: use a whole number of epochs >= 0.")
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise ConfigError(f"algo.min_lr={min_lr!r} is not valid: use a number >= 0, the outer LR that cosine annealing ends at.")
        if ca and scheduler is not None:
            raise ConfigError("algo.ca=true is the outer LR schedule: set algo.scheduler=null, or algo.ca=false to use your scheduler.")
        rows = max(inner_steps, 1) if isinstance(inner_steps, int) else 1  # one per training step
        if (bnrs or bnwb) and use_step_batch_norm(model, rows, per_step_weights=bnwb, per_step_statistics=bnrs) == 0:
            raise ConfigError(
                f"algo.bnrs / algo.bnwb need BatchNorm2d layers, and {type(model).__name__} has none: "
                "set algo.bnrs=false algo.bnwb=false, or use a model with BatchNorm (model=conv4...)."
            )
        super().__init__(
            model, inner_lr, inner_steps, eval_inner_steps, first_order, optimizer, scheduler, gradient_clip_val,
            task_parallel, max_nonfinite_steps, eval_inner_lr, transductive,
        )
        self.msl, self.msl_epochs, self.da, self.da_epochs = msl, msl_epochs, da, da_epochs
        self.bnrs, self.lslr, self.ca, self.min_lr = bnrs, lslr, ca, min_lr
        normalization = {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            if isinstance(module, NORMALIZATION)
            for name, _ in module.named_parameters(recurse=False)
        }
        weights = {k: v for k, v in split_state(model)[0].items() if k in self.adapted_weights and k not in normalization}
        self.adapted_weights = frozenset(weights)
        if lslr:
            self.step_sizes = LearnedStepSizes(weights, inner_lr, steps=rows)
            self.train_loop = dataclasses.replace(self.train_loop, learned_lr="per_step")
            self.eval_loop = dataclasses.replace(self.eval_loop, learned_lr="per_step")
        if bnrs and not transductive:
            for module in model.modules():
                if isinstance(module, StepBatchNorm2d):
                    module.use_running_statistics = True
        self._statistics_plan: list[tuple[StepBatchNorm2d, int]] = []

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Adapt all but the BatchNorm weights; learned per-step step sizes (LSLR); record batch statistics (BNRS)."""
        options: dict[str, Any] = {"adapted": self.adapted_weights}
        if self.lslr:
            options["step_sizes"] = self.step_sizes.by_weight(detached=not training)
        if self.bnrs and training:
            options["statistics_plan"] = self._statistics_plan
        return options

    def current_train_loop(self) -> InnerLoop:
        """First order during the first da_epochs epochs when DA is on, else the configured order."""
        if self.da and self.current_epoch < self.da_epochs:
            return dataclasses.replace(self.train_loop, first_order=True)
        return self.train_loop

    def loss_weights(self) -> Sequence[float] | None:
        """MSL weights during the first msl_epochs epochs, then None (the last step's loss only)."""
        if not self.msl or self.current_epoch >= self.msl_epochs:
            return None
        return msl_weights(self.train_loop.steps, self.current_epoch, self.msl_epochs)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """CA: cosine from the initial outer LR to min_lr over trainer.max_steps meta-steps."""
        if not self.ca:
            return super().build_scheduler(optimizer)
        total = self.trainer.max_steps
        if total <= 0:
            raise ConfigError("algo.ca=true anneals the outer LR over the whole run, which has no end: set trainer.max_steps.")
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=self.min_lr)

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """MAML's meta-step, then (BNRS) the running statistics move toward this meta-batch's batch statistics."""
        outcome = super().compute_meta_gradient(batch, measure)
        if self.bnrs and outcome.batch_statistics:
            self._fold_batch_statistics(outcome.batch_statistics)
        return outcome

    def _fold_batch_statistics(self, statistics: tuple[Tensor, ...]) -> None:
        """Average each recorded [mean; var] over tasks and ranks (one collective), then update the tables in call order."""
        means = [s.detach().mean(dim=0) for s in statistics]
        flat = torch.cat([m.flatten() for m in means])
        if self._trainer is not None:
            flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        for (layer, step), chunk in zip(self._statistics_plan, flat.split([m.numel() for m in means])):
            layer.update_running_statistics(step, chunk.view(2, -1))
