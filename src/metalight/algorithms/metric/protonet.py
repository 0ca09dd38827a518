"""Prototypical Networks (Snell et al. 2017): classify queries by their distance to the mean embedding of each class."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.base import OptimizerFactory, SchedulerFactory, outcome_of_logits, require_features_and_head
from metalight.algorithms.metric.learner import MetricLearner, embed_task
from metalight.algorithms.metric.finetune import finetune_and_score
from metalight.algorithms.optimization.functional import Params, TaskOutcome, split_state
from metalight.tasks.kinds import accuracy
from metalight.algorithms.optimization.reptile import task_generator
from metalight.errors import ConfigError


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Mean embedding of each class [n_way, D] from support embeddings [N*K, D] and their labels 0..n_way-1."""
    one_hot = F.one_hot(labels, n_way).to(embeddings.dtype)
    return one_hot.T @ embeddings / one_hot.sum(dim=0).unsqueeze(1)


def negative_squared_distances(queries: Tensor, centers: Tensor) -> Tensor:
    """Logits [Q, N]: -||q - c||^2 for every query q [Q, D] and center c [N, D]."""
    return -(queries.pow(2).sum(1, keepdim=True) - 2 * queries @ centers.T + centers.pow(2).sum(1))


class ProtoNet(MetricLearner):
    """Prototypical Networks: no inner loop; logits are negative squared Euclidean distances to class prototypes.

    The model's `features` embed the images (its linear head is dropped: it is not used). With
    running BatchNorm statistics (model.track_running_stats=true, as in the authors' code and our
    protocols) evaluation runs in eval mode and is inductive. With batch statistics, a task's support
    and query images are embedded as one batch (transductive) or, with transductive=false, the
    support set alone and each query with the support set.
    Training tasks may have more ways and other shot/query counts than evaluation tasks
    (data.n_way_train, data.k_shot_train, data.k_query_train), as in the paper. The outer optimizer
    defaults to Adam(lr=1e-3); the paper halves the LR every 2,000 episodes (conf/algo/protonet.yaml).
    finetune_steps > 0 fine-tunes the body on each val/test task's support set before the prototypes are
    taken (Hu et al. 2022, P>M>F; finetune.py), with the query accuracy after every step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        require_features_and_head(model, "ProtoNets")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ConfigError(f"algo.finetune_steps={finetune_steps!r} is not valid: use a whole number >= 0 (0: no fine-tuning; Hu et al.: 50).")
        if not finetune_lr > 0:
            raise ConfigError(f"algo.finetune_lr={finetune_lr!r} is not valid: use a number > 0, or algo.finetune_steps=0 for none (Hu et al. choose per domain among 0, 1e-4, 1e-3 and 1e-2).")
        model.head = nn.Identity()  # model(x) is now the embedding
        super().__init__(model, optimizer, scheduler, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.finetune_steps, self.finetune_lr, self.seed = finetune_steps, finetune_lr, seed

    @property
    def eval_steps(self) -> int | None:
        """Fine-tuning steps at evaluation (one accuracy each), None without fine-tuning."""
        return self.finetune_steps or None

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-3), the paper's optimizer."""
        return torch.optim.Adam(params, lr=1e-3)

    def task_fn(self, n_way: int, keep_logits: bool = False) -> Callable[..., TaskOutcome]:
        """(params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one task, as run_tasks takes it."""
        _, fixed = split_state(self.model)
        transductive = self.transductive

        def embed(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.model, (params, fixed), (x,))

        def run(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, indices: None) -> TaskOutcome:
            support, queries = embed_task(lambda x: embed(params, x), support_x, query_x, transductive)
            logits = negative_squared_distances(queries, prototypes(support, support_y, n_way))
            kept = logits.detach().unsqueeze(0) if keep_logits else logits.new_zeros(0)
            return TaskOutcome(F.cross_entropy(logits, query_y), accuracy(logits.detach(), query_y).unsqueeze(0), {}, kept)

        return run

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Query accuracy of each task from its prototypes: scores [B, 1], or [B, finetune_steps + 1] when fine-tuning."""
        if self.finetune_steps:
            return self.finetuned_tasks(batch, stream, task_ids, keep_logits)
        return super().evaluate_tasks(batch, stream, task_ids, keep_logits)

    def finetuned_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool) -> TaskOutcome:
        """Fine-tune a copy of the body on each task's support set (seeded per task), scoring its queries after every step."""
        n_way = self.n_way_of(batch)

        def classify(support: Tensor, support_y: Tensor, queries: Tensor) -> Tensor:
            return negative_squared_distances(queries, prototypes(support, support_y, n_way))

        with torch.enable_grad():
            logits = torch.stack([
                finetune_and_score(self.model, classify, sx, sy, qx, self.finetune_steps, self.finetune_lr, task_generator(self.seed, stream, 0, task))
                for sx, sy, qx, task in zip(batch["support_x"], batch["support_y"], batch["query_x"], task_ids)
            ])
        return outcome_of_logits(logits, batch["query_y"], keep_logits)
