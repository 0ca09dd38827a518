"""SNAIL (Mishra et al. 2018): the support set as a sequence of (embedding, one-hot label), then a query with no label; causal TC and attention blocks read it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.base import OptimizerFactory, SchedulerFactory, require_features_and_head
from metalight.algorithms.optimization.functional import Params, TaskOutcome, _prefixed, split_state
from metalight.algorithms.metric.learner import MetricLearner, embed_task
from metalight.algorithms.optimization.reptile import task_generator
from metalight.errors import ConfigError
from metalight.models.snail import SNAILNet
from metalight.tasks.kinds import accuracy

# the paper's blocks for Omniglot and miniImageNet (appendix; eambutu/snail-pytorch's SnailFewShot)
PAPER_BLOCKS = [["attention", 64, 32], ["tc", 128], ["attention", 256, 128], ["tc", 128], ["attention", 512, 256]]


class SNAIL(MetricLearner):
    """SNAIL for few-shot classification: no inner loop; one forward pass over the labelled support set reads each query.

    The model's `features` embed the images (its linear head is dropped; its input width sizes SNAIL's
    first linear layer, the paper's "single fully-connected layer" to a 64-d embedding). Each query is
    its own sequence, as in the paper and eambutu/snail-pytorch: the task's N*K support examples as
    (embedding, one-hot label), in an order shuffled per task, then the query with a zero label; the loss
    is the cross-entropy at that last position. The queries of a task share the support prefix, which is
    run once (SNAILNet's forward(prefix, queries), equal to running each sequence alone). Where the
    re-implementation draws a fresh support set per query (batches of 32 one-query episodes), a task here
    has N*k_query queries over one support set. The shuffle is a pure function of (seed, stream, step,
    task): val/test tasks keep one order, and DDP and resumed runs see the orders one process would.
    The sequence length T = n_way * k_shot + 1 is fixed when the network is built (its TC blocks have
    ceil(log2 T) levels): tasks of other shapes are refused, training tasks (n_way_train, k_shot_train:
    data.n_way_train, data.k_shot_train, null = the same) when the learner is built.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        k_shot: int,
        blocks: list | None = None,
        embedding: int = 64,
        n_way_train: int | None = None,
        k_shot_train: int | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
        shuffle_support: bool = True,
        seed: int = 0,
    ) -> None:
        require_features_and_head(model, "SNAIL")
        if not isinstance(model.head, nn.Linear):
            raise ConfigError(
                f"SNAIL sizes its first layer by the embedding, read from the model's linear head, but {type(model).__name__}'s head "
                f"is a {type(model.head).__name__}: use model=conv4, conv4_strided, conv4_mini, resnet12 or timm."
            )
        for key, value in (("n_way", n_way), ("k_shot", k_shot), ("embedding", embedding)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"algo.{key}={value!r} is not valid: use a whole number >= 1 (algo.n_way and algo.k_shot follow data.n_way and data.k_shot).")
        blocks = [list(spec) for spec in (PAPER_BLOCKS if blocks is None else blocks)]  # plain lists: checkpoints keep them as hyperparameters
        model.snail = SNAILNet(model.head.in_features, n_way, n_way * k_shot + 1, blocks, embedding).to(model.head.weight.dtype)
        model.head = nn.Identity()  # model(x) is now the embedding
        super().__init__(model, optimizer, scheduler, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.n_way, self.k_shot, self.shuffle_support, self.seed = n_way, k_shot, shuffle_support, seed
        ways = n_way if n_way_train is None else n_way_train
        self.check_shape(ways, ways * (k_shot if k_shot_train is None else k_shot_train))  # before a run writes anything

    def check_shape(self, n_way: int, support_size: int) -> None:
        """ConfigError unless tasks have the network's n_way and support sequences it was sized for."""
        if n_way != self.n_way:
            raise ConfigError(
                f"SNAIL scores {self.n_way} classes (data.n_way) but got {n_way}-way tasks: train and test with one data.n_way "
                "(leave data.n_way_train unset)."
            )
        self.model.snail.check_length(support_size + 1)

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-4), eambutu/snail-pytorch's default."""
        return torch.optim.Adam(params, lr=1e-4)

    def support_order(self, size: int, stream: str, step: int, task: int) -> Tensor:
        """Positions in the sequence of a task's support examples: a shuffle drawn from (seed, stream, step, task), or as given."""
        if not self.shuffle_support:
            return torch.arange(size)
        return torch.randperm(size, generator=task_generator(self.seed, stream, step, task))

    def ordered(self, batch: dict[str, Tensor], stream: str, step: int, task_ids: list[int]) -> dict[str, Tensor]:
        """The batch with each task's support set in its sequence order."""
        size = batch["support_y"].shape[1]
        order = torch.stack([self.support_order(size, stream, step, task) for task in task_ids]).to(batch["support_y"].device)
        return batch | {key: torch.stack([t[o] for t, o in zip(batch[key], order)]) for key in ("support_x", "support_y")}

    def task_fn(self, n_way: int, keep_logits: bool = False) -> Callable[..., TaskOutcome]:
        """(params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one task: each query read after the support sequence."""
        _, fixed = split_state(self.model)
        snail_fixed = _prefixed(fixed, "snail")
        transductive = self.transductive

        def run(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, indices: None) -> TaskOutcome:
            support, queries = embed_task(lambda x: functional_call(self.model, (params, fixed), (x,)).flatten(1), support_x, query_x, transductive)
            logits = functional_call(self.model.snail, (_prefixed(params, "snail"), snail_fixed), (support, support_y, queries))
            kept = logits.detach().unsqueeze(0) if keep_logits else logits.new_zeros(0)
            return TaskOutcome(F.cross_entropy(logits, query_y), accuracy(logits.detach(), query_y).unsqueeze(0), {}, kept)

        return run

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Backpropagate the mean query loss of the meta-batch, support sets in their training order (DDP averages it)."""
        n_tasks = batch["support_x"].shape[0]
        self.check_shape(self.n_way_of(batch), batch["support_y"].shape[1])
        task_ids = [self.global_rank * n_tasks + j for j in range(n_tasks)]  # each rank holds a contiguous share
        return super().compute_meta_gradient(self.ordered(batch, "train", self.global_step, task_ids), measure)

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Query accuracy of each task, [B, 1], its support set in the task's fixed order."""
        self.check_shape(self.n_way_of(batch), batch["support_y"].shape[1])
        return super().evaluate_tasks(self.ordered(batch, stream, 0, task_ids), stream, task_ids, keep_logits)

    def support_attention(self, task: dict[str, Tensor], stream: str = "val", task_id: int = 0) -> Tensor:
        """The last attention block's weights [Q, S] from each query over the support examples, in the task's own support order.

        The task (support_x, support_y, query_x of one task, on the module's device) is read in the order
        evaluation reads it; the weight a query puts on itself is left out (a row sums to 1 minus it).
        """
        order = self.support_order(len(task["support_y"]), stream, 0, task_id).to(task["support_y"].device)
        with torch.no_grad():
            support, queries = embed_task(lambda x: self.model(x).flatten(1), task["support_x"][order], task["query_x"], self.transductive)
            _, weights = self.model.snail(support, task["support_y"][order], queries, attention=True)
        in_task_order = torch.empty_like(weights[:, :-1])
        in_task_order[:, order] = weights[:, :-1]
        return in_task_order
