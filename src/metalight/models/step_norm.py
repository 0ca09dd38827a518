"""Per-inner-step BatchNorm (MAML++'s BNWB and BNRS): one row of weights/biases and running statistics per step.

The inner loop says which step it is at with `inner_step(k)`; a `StepBatchNorm2d` then normalizes with
row k of its tables (the last row when k is beyond them). Running statistics are never updated in place
(the vmap path forbids it, and DDP ranks would drift apart): inside `recording_batch_statistics()` each
training-mode forward records its batch mean and variance, the inner loop returns them with the task,
and the algorithm folds the mean over all tasks of all ranks into the tables once per meta-step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.errors import ConfigError

_STEP: ContextVar[int] = ContextVar("metalight_inner_step", default=0)
_RECORDS: ContextVar[list | None] = ContextVar("metalight_batch_statistics", default=None)


@contextmanager
def inner_step(step: int) -> Iterator[None]:
    """Forwards inside use row `step` of every StepBatchNorm2d's per-step tables."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


@contextmanager
def recording_batch_statistics() -> Iterator[list[tuple[StepBatchNorm2d, int, Tensor]]]:
    """Collect (layer, step, [mean; unbiased var]) of every training-mode StepBatchNorm2d forward, in call order."""
    records: list[tuple[StepBatchNorm2d, int, Tensor]] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


class StepBatchNorm2d(nn.Module):
    """BatchNorm over [B, C, H, W] with per-step affine weights (BNWB) and/or per-step running statistics (BNRS).

    It normalizes with the batch's own statistics, except in eval mode with `use_running_statistics`
    set, where it uses the running statistics of the current step (non-transductive evaluation).
    """

    def __init__(self, num_features: int, steps: int, per_step_weights: bool, per_step_statistics: bool, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.steps, self.momentum, self.eps = steps, momentum, eps
        self.per_step_weights, self.per_step_statistics = per_step_weights, per_step_statistics
        rows = steps if per_step_weights else 1
        self.weight = nn.Parameter(torch.ones(rows, num_features))
        self.bias = nn.Parameter(torch.zeros(rows, num_features))
        if per_step_statistics:
            self.register_buffer("running_mean", torch.zeros(steps, num_features))
            self.register_buffer("running_var", torch.ones(steps, num_features))
        self.use_running_statistics = False

    def forward(self, x: Tensor) -> Tensor:
        """Normalize with row min(step, steps - 1) of the tables."""
        step = min(_STEP.get(), self.steps - 1)
        row = step if self.per_step_weights else 0
        weight, bias = self.weight[row], self.bias[row]
        if self.per_step_statistics and not self.training and self.use_running_statistics:
            return F.batch_norm(x, self.running_mean[step], self.running_var[step], weight, bias, False, 0.0, self.eps)
        records = _RECORDS.get()
        if records is not None and self.per_step_statistics and self.training:
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=1)
            records.append((self, step, torch.stack([mean, var])))
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    @torch.no_grad()
    def update_running_statistics(self, step: int, statistics: Tensor) -> None:
        """Exponential moving average of row `step` toward a [mean; var] pair, with this layer's momentum."""
        self.running_mean[step].lerp_(statistics[0], self.momentum)
        self.running_var[step].lerp_(statistics[1], self.momentum)


def use_step_batch_norm(model: nn.Module, steps: int, per_step_weights: bool, per_step_statistics: bool) -> int:
    """Replace every nn.BatchNorm2d of `model` by a fresh StepBatchNorm2d with `steps` rows; return how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                if type(child) is not nn.BatchNorm2d:  # e.g. timm's BatchNormAct2d: its activation would be lost
                    raise ConfigError(
                        f"algo.bnrs / algo.bnwb replace nn.BatchNorm2d, and {name} is a {type(child).__name__}, which does more "
                        "(timm fuses the activation into it): set algo.bnrs=false algo.bnwb=false, or use a model with plain "
                        "BatchNorm2d (model=conv4, model=resnet12, timm's resnets)."
                    )
                norm = StepBatchNorm2d(child.num_features, steps, per_step_weights, per_step_statistics, eps=child.eps)
                like = next(child.parameters(), next(child.buffers(), None))
                setattr(module, name, norm if like is None else norm.to(like))
                replaced += 1
    return replaced
