"""The task interface: what a learner needs from a family of tasks besides its support and query tensors.

A task is a support set (support_x, support_y) and a query set (query_x, query_y). What kind of task
it is decides the loss the inner and outer loops minimize and the metric recorded after every inner
step. Classification: cross-entropy on logits [n, ways], accuracy. Regression: mean squared error on
predictions shaped like the targets, reported as MSE. Every gradient-based learner reads both
through `TaskKind`, so a new kind of task is one more `TaskKind`, not a change to the learners.

Reinforcement learning plugs in at the same seam: its support and query "sets" are rollouts, its loss
a policy-gradient surrogate of (log-probabilities, advantages), its metric the return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metalight.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def mean_squared_error(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean over every element of (prediction - target)^2, the loss and metric of Finn et al.'s regression."""
    return (predictions - targets).pow(2).mean()


@dataclass(frozen=True)
class TaskKind:
    """A family of tasks' loss (minimized by the inner and outer loops) and metric (recorded after every inner step).

    metric names the logged values (val/<metric>, val/<metric>_step<k>, test/<metric>_ci95);
    higher_is_better says which way the best checkpoint and a sweep's summary go.
    """

    name: str
    metric: str
    higher_is_better: bool
    loss: LossFn
    score: LossFn

    def with_loss(self, loss: LossFn) -> TaskKind:
        """The same kind minimizing another loss (a user's own); the metric stays the kind's."""
        return TaskKind(self.name, self.metric, self.higher_is_better, loss, self.score)


def policy_gradient_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE's surrogate: minus the mean over time steps of log pi(a|s) times the (constant) advantage."""
    return -(log_probs * advantages).mean()


def average_return(rewards: Tensor, mask: Tensor) -> Tensor:
    """The undiscounted return of each rollout (rewards [..., T] of its live steps, mask [..., T]) averaged over the rollouts."""
    return (rewards * mask).sum(-1).mean()


CLASSIFICATION = TaskKind("classification", "acc", True, F.cross_entropy, accuracy)
REGRESSION = TaskKind("regression", "mse", False, mean_squared_error, mean_squared_error)
# reinforcement learning (tasks/rl.py): a learner samples its own rollouts, so only RL learners take it
# (algo=maml_rl); it is not in KINDS, the kinds every gradient-based learner takes by default
REINFORCEMENT = TaskKind("reinforcement", "return", True, policy_gradient_loss, average_return)
KINDS = {kind.name: kind for kind in (CLASSIFICATION, REGRESSION)}

REGRESSION_LOSSES: dict[str, LossFn] = {"mse": mean_squared_error, "l1": lambda p, t: (p - t).abs().mean(), "huber": F.huber_loss}


def regression_loss(name: str) -> LossFn:
    """A regression loss by name (mse, l1, huber) or a dotted path to a function (predictions, targets) -> scalar; ConfigError otherwise."""
    if name in REGRESSION_LOSSES:
        return REGRESSION_LOSSES[name]
    from metalight.tasks.families import import_callable  # the same importer as data.family

    function = import_callable(name, "data.loss", f"one of {', '.join(REGRESSION_LOSSES)} or a dotted path to your loss function")
    probe = function(torch.zeros(3, 1), torch.ones(3, 1))
    if not isinstance(probe, Tensor) or probe.dim() != 0:
        raise ConfigError(f"data.loss={name!r} must return one scalar tensor for (predictions, targets), got {type(probe).__name__}.")
    return function
