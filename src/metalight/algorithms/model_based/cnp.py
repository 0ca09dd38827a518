"""Conditional Neural Processes (Garnelo et al. 2018): a model-based learner that reads the support set in one forward pass."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule, OptimizerFactory, SchedulerFactory
from metalight.algorithms.optimization.functional import TaskOutcome
from metalight.errors import ConfigError
from metalight.models.cnp import CNPNetwork
from metalight.tasks.kinds import REGRESSION, TaskKind


def gaussian_nll(mean: Tensor, std: Tensor, targets: Tensor) -> Tensor:
    """Per task [...]: -log N(targets; mean, diag(std^2)) summed over output dimensions, averaged over points [..., Q, D]."""
    per_element = 0.5 * math.log(2 * math.pi) + std.log() + 0.5 * ((targets - mean) / std).pow(2)
    return per_element.sum(dim=-1).mean(dim=-1)


class CNP(EpisodicModule):
    """CNP: no inner loop; the network maps (support set, query inputs) to a Gaussian per query point.

    Training minimizes the Gaussian negative log-likelihood of the query targets (the reference's
    -mean log p; with support_in_targets the support points are targets too, as the reference notebook
    trains). Validation and test score the query MSE of the predicted mean with the task kind's metric,
    one column per task (no steps), so val/mse compares with the other learners' on the same tasks;
    val/loss is the NLL. Regression tasks only: the network's input is (x, y) pairs of real numbers.
    """

    task_kinds = ("regression",)

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        max_nonfinite_steps: int = 10,
        support_in_targets: bool = False,
    ) -> None:
        if not isinstance(model, CNPNetwork):
            raise ConfigError(
                f"algo=cnp needs its network, model=cnp (metalight.models.CNPNetwork: encoder, mean aggregation, Gaussian "
                f"decoder), but model is {type(model).__name__}: drop the model= override (algo=cnp picks model=cnp)."
            )
        if not isinstance(support_in_targets, bool):
            raise ConfigError(f"algo.support_in_targets={support_in_targets!r} is not valid: use true or false.")
        super().__init__(model, optimizer, scheduler, gradient_clip_val, "auto", max_nonfinite_steps)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.support_in_targets = support_in_targets
        self.task_kind = REGRESSION  # its one kind, also without a data module (tests, hand-built Trainers)

    def use_task_kind(self, kind: TaskKind) -> None:
        """Learn regression tasks; ConfigError for another kind or another training loss (a CNP minimizes its Gaussian NLL)."""
        self.check_task_kind(kind)
        if kind.loss is not REGRESSION.loss:
            raise ConfigError(
                "algo=cnp minimizes the Gaussian negative log-likelihood of its predicted mean and std, so data.loss "
                "does not apply: remove the data.loss override (data.loss=mse); the reported metric is the MSE either way."
            )
        self.task_kind = kind

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-4), the reference notebook's."""
        return torch.optim.Adam(params, lr=1e-4)

    def outcome(self, batch: dict[str, Tensor], training: bool = False, keep_logits: bool = False) -> TaskOutcome:
        """The NLL per task [B] (the loss), the query MSE of the mean per task [B, 1], and the query means [B, 1, Q, D] if kept.

        The NLL is over the query points, or while training with support_in_targets over the support and query
        points together (the support set is still the only context).
        """
        support_x, support_y, query_x, query_y = batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"]
        with_support = training and self.support_in_targets
        targets_x = torch.cat([support_x, query_x], dim=-2) if with_support else query_x
        targets_y = torch.cat([support_y, query_y], dim=-2) if with_support else query_y
        mean, std = self.model(support_x, support_y, targets_x)
        loss = gaussian_nll(mean, std, targets_y)
        mean = mean[..., -query_x.shape[-2] :, :].detach()
        scores = torch.stack([self.task_kind.score(m, y) for m, y in zip(mean, query_y)]).unsqueeze(1)
        return TaskOutcome(loss, scores, {}, mean.unsqueeze(1) if keep_logits else mean.new_zeros(0))

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Backpropagate the meta-batch's mean NLL through manual_backward (DDP averages it)."""
        outcome = self.outcome(batch, training=True)
        self.manual_backward(outcome.loss.mean())
        return outcome

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Query MSE of the predicted mean for each task, scores [B, 1]; keep_logits: the means [B, 1, Q, output_dim]."""
        with torch.no_grad():
            return self.outcome(batch, keep_logits=keep_logits)
