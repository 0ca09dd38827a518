"""Relation Networks (Sung et al. 2018): a learned module scores each (class, query) pair of feature maps, trained by MSE on one-hot targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.base import OptimizerFactory, SchedulerFactory, require_features_and_head
from metalight.algorithms.metric.learner import MetricLearner
from metalight.algorithms.optimization.functional import Params, TaskOutcome, _prefixed, split_state
from metalight.errors import ConfigError
from metalight.models.conv4_relation import sung_init_
from metalight.tasks.kinds import accuracy


class RelationModule(nn.Module):
    """Sung et al.'s RelationNetwork: 2 x [conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool] on a (class, query) map pair, then linear -> ReLU -> linear -> sigmoid.

    Input: the class's and the query's feature maps concatenated on channels, [P, 2C, h, w]; output one
    relation score in (0, 1) per pair, [P]. Their Omniglot module pads its convs by 1 (5x5 maps -> 1x1),
    their miniImageNet module by 0 (19x19 -> 3x3); the first linear layer takes what is left.
    """

    def __init__(self, feature_map: tuple[int, int, int], channels: int = 64, hidden: int = 8, padding: int = 1, track_running_stats: bool = False) -> None:
        super().__init__()
        depth, side, _ = feature_map
        blocks: list[nn.Module] = []
        for c_in in (2 * depth, channels):
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, channels, kernel_size=3, padding=padding),
                nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ))
            side = (side - 2 + 2 * padding) // 2
            if side < 1:
                raise ConfigError(
                    f"the relation module cannot take {feature_map[1]}x{feature_map[2]} feature maps with algo.relation_padding={padding}: "
                    "two 3x3 convs and 2x2 max-pools need maps of at least 2x2 (padding 1) or 6x6 (padding 0); use larger images or padding 1."
                )
        self.blocks = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(channels * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: Tensor) -> Tensor:
        """Relation scores [P] of concatenated (class, query) map pairs [P, 2C, h, w]."""
        out = self.blocks(pairs).flatten(1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(out)))).squeeze(-1)


def class_maps(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """The sum of each class's support feature maps [n_way, C, h, w] (Sung et al.'s K-shot class feature; the map itself for 1 shot)."""
    one_hot = F.one_hot(labels, n_way).to(support.dtype)
    return torch.einsum("sn,schw->nchw", one_hot, support)


def relation_pairs(queries: Tensor, classes: Tensor) -> Tensor:
    """Every (query, class) pair as one map [Q * N, 2C, h, w], query-major; channels: the class's map, then the query's (their order)."""
    n_queries, n_way = len(queries), len(classes)
    both = torch.cat([classes.unsqueeze(0).expand(n_queries, -1, -1, -1, -1), queries.unsqueeze(1).expand(-1, n_way, -1, -1, -1)], dim=2)
    return both.flatten(0, 1)


class RelationNet(MetricLearner):
    """Relation Networks: no inner loop; each query is scored against each class by a learned relation module.

    Follows the authors' code, floodsung/LearningToCompare_FSL (omniglot_train_*_shot.py,
    miniimagenet_train_*_shot.py): the embedding keeps its spatial map (model=conv4_relation, their
    CNNEncoder); a class's map is its support maps summed (K shots; the map itself for one shot); each
    (class, query) pair is concatenated on channels, class first, and the relation module (RelationModule)
    gives a score in (0, 1); the loss is the mean squared error between the [Q, N] scores and the queries'
    one-hot labels (not cross-entropy), the prediction the highest score. Adam 1e-3 halved every 100,000
    episodes and gradient-norm clipping at 0.5 (theirs clips encoder and relation module separately at 0.5
    each; here the one norm over both); their init (conv N(0, sqrt(2/(9*out))), linear N(0, 0.01) with bias 1)
    with init="sung". Their BatchNorm is always in training mode (they never call .eval()): with
    model.track_running_stats=false and relation_running_stats=false (the defaults) every BatchNorm uses the
    statistics of its batch at evaluation too, so what shares a forward pass shares BatchNorm statistics:
    embed="joint" (ours) embeds a task's support set and its queries as one batch; embed="separate" (theirs,
    in training and at test) embeds the support set alone, so a 1-shot support set is normalized by its own
    N images, and the queries as a second batch. transductive=true relates all pairs as one batch and embeds
    the queries together; false relates each query's N pairs alone and embeds each query alone (separate)
    or with the support set (joint).
    The model must say the shape of the map its `features` flatten in a `feature_map` attribute (C, h, w),
    as model=conv4_relation does; another stops when the run starts. Text is refused: its encoders give vectors,
    which a relation module of convolutions cannot take (ProtoNets and Matching Networks compare them).
    """

    modalities = ("images",)


    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = 0.5,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        relation_padding: int = 1,
        relation_running_stats: bool = False,
        init: str = "sung",
        embed: str = "joint",
    ) -> None:
        require_features_and_head(model, "Relation Networks")
        if embed not in ("joint", "separate"):
            raise ConfigError(f"algo.embed={embed!r} is not known: use joint (support and queries in one BatchNorm batch) or separate (two batches, Sung et al.'s code).")
        self.embed_mode = embed
        if init not in ("sung", "default"):
            raise ConfigError(f"algo.init={init!r} is not known: use sung (Sung et al.'s weights_init for the relation module) or default (PyTorch's).")
        if relation_padding not in (0, 1):
            raise ConfigError(f"algo.relation_padding={relation_padding!r} is not valid: use 1 (their Omniglot module) or 0 (their miniImageNet module).")
        feature_map = getattr(model, "feature_map", None)
        self.map_problem: str | None = None
        model.head = nn.Identity()  # model(x) is now the flattened feature map
        if isinstance(feature_map, tuple) and len(feature_map) == 3:
            relation = RelationModule(feature_map, relation_channels, relation_hidden, relation_padding, relation_running_stats)
            if init == "sung":
                sung_init_(relation)
            model.relation = relation.to(next(model.features.parameters()).dtype)
        else:  # test_config builds every algorithm on every model: refuse when a run starts (setup)
            self.map_problem = (
                f"algo=relationnet compares spatial feature maps, but {type(model).__name__}'s features end in a vector "
                "(no `feature_map` (C, h, w) attribute): use model=conv4_relation (Sung et al.'s embedding, no final pooling), "
                "or give your network features returning flattened [C, h, w] maps and that attribute."
            )
        super().__init__(model, optimizer, scheduler, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])

    def setup(self, stage: str) -> None:
        """The task kind check of the base class, then refuse a model without a spatial feature map."""
        super().setup(stage)
        self.require_feature_map()

    def require_feature_map(self) -> None:
        """ConfigError when the model's features have no spatial map to relate."""
        if self.map_problem is not None:
            raise ConfigError(self.map_problem)

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-3), the authors' optimizer."""
        return torch.optim.Adam(params, lr=1e-3)

    def task_fn(self, n_way: int, keep_logits: bool = False) -> Callable[..., TaskOutcome]:
        """(params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one task, as run_tasks takes it; logits are relation scores."""
        self.require_feature_map()
        _, fixed = split_state(self.model)
        relation_fixed = _prefixed(fixed, "relation")
        feature_map = self.model.feature_map
        transductive = self.transductive
        separate = self.embed_mode == "separate"

        def embed(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.model, (params, fixed), (x,)).unflatten(1, feature_map)

        def relate(params: Params, queries: Tensor, classes: Tensor) -> Tensor:
            scores = functional_call(self.model.relation, (_prefixed(params, "relation"), relation_fixed), (relation_pairs(queries, classes),))
            return scores.view(len(queries), len(classes))

        def run(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, indices: None) -> TaskOutcome:
            if transductive and not separate:
                embedded = embed(params, torch.cat([support_x, query_x]))
                support, queries = embedded[: len(support_x)], embedded[len(support_x) :]
                scores = relate(params, queries, class_maps(support, support_y, n_way))
            else:
                classes = class_maps(embed(params, support_x), support_y, n_way)
                if transductive:
                    scores = relate(params, embed(params, query_x), classes)
                else:
                    alone = (lambda q: embed(params, q.unsqueeze(0))[0]) if separate else (lambda q: embed(params, torch.cat([support_x, q.unsqueeze(0)]))[-1])
                    scores = torch.vmap(lambda q: relate(params, q.unsqueeze(0), classes)[0])(torch.vmap(alone)(query_x))
            loss = F.mse_loss(scores, F.one_hot(query_y, n_way).to(scores.dtype))
            kept = scores.detach().unsqueeze(0) if keep_logits else scores.new_zeros(0)
            return TaskOutcome(loss, accuracy(scores.detach(), query_y).unsqueeze(0), {}, kept)

        return run
