"""MetricLearner: the shared meta-step and evaluation of the learners without an inner loop that classify by comparing embeddings.

A subclass provides `task_fn(n_way, keep_logits)`, the function of one task (params, support_x, support_y,
query_x, query_y, indices) -> TaskOutcome that run_tasks takes; this class trains it on the vmap or loop
path through `meta_backward` (DDP averages the gradient) and scores evaluation tasks with it without
gradients. ProtoNets, Matching Networks and Relation Networks are such learners, and SNAIL (model-based:
one forward pass over the support set, no inner loop) takes the same machinery.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metalight.algorithms.base import EpisodicModule
from metalight.algorithms.optimization.functional import TaskOutcome, run_tasks, split_state


def embed_task(embed: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor, transductive: bool) -> tuple[Tensor, Tensor]:
    """Embeddings of a task's support set and queries: as one batch (transductive, with batch-statistics BatchNorm), or
    the support set alone and each query in a batch with the support set (so no query sees another one)."""
    if transductive:
        embedded = embed(torch.cat([support_x, query_x]))
        return embedded[: len(support_x)], embedded[len(support_x) :]
    return embed(support_x), torch.vmap(lambda q: embed(torch.cat([support_x, q.unsqueeze(0)]))[-1])(query_x)


class MetricLearner(EpisodicModule):
    """A learner whose one task is `task_fn(n_way)`: no inner loop, one score per task, classification only."""

    task_kinds = ("classification",)  # scores over the support set's classes

    def task_fn(self, n_way: int, keep_logits: bool = False) -> Callable[..., TaskOutcome]:
        """(params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one n_way-way task."""
        raise NotImplementedError

    @staticmethod
    def n_way_of(batch: dict[str, Tensor]) -> int:
        """Ways of the batch's tasks (labels are 0..n_way-1; training and evaluation tasks may differ)."""
        return int(batch["support_y"][0].max()) + 1

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Backpropagate the mean query loss of the meta-batch (DDP averages it)."""
        params, _ = split_state(self.model)
        return self.meta_backward(self.task_fn(self.n_way_of(batch)), params, batch, second_order=False)

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Query accuracy of each task, [B, 1] (logits kept for eval.py and FewShotLearner)."""
        params, _ = split_state(self.model)
        with torch.no_grad():
            return run_tasks(self.task_fn(self.n_way_of(batch), keep_logits), params, batch, None, self.path(), second_order=False)
