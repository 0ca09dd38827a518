"""Baseline and Baseline++ (Chen et al. 2019) and RFS-simple (Tian et al. 2020): pretrain on all training classes, fit a head per task."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule, OptimizerFactory, SchedulerFactory, outcome_of_logits, require_features_and_head
from metalight.algorithms.optimization.functional import TaskOutcome
from metalight.tasks.kinds import accuracy
from metalight.algorithms.baselines.heads import FEATURES, HEADS, FitRecipe, fit_heads, fit_logistic, pretraining_classifier
from metalight.algorithms.optimization.reptile import task_generator
from metalight.errors import ConfigError


class Baseline(EpisodicModule):
    """The body (model.features) and a classifier over every training class, trained with cross-entropy on labelled images.

    Training batches are minibatches of images (data.train_mode=flat), not tasks. At validation and test
    the classifier is dropped: each task's support and query images are embedded as one batch (with
    model.track_running_stats=true, as the protocols set, each embedding uses BatchNorm's running
    statistics and is independent of the others), a new head is fitted on the support embeddings
    and scores the queries. `head`: linear (Baseline: linear pretraining classifier, linear head fitted
    by SGD), cosine (Baseline++: cosine classifier in both places) or logistic (RFS-simple: linear
    pretraining classifier, scikit-learn's logistic regression on L2-normalized features). `features`:
    what the per-task head sees, the body's embedding (Chen et al.'s, the default) or the pretraining
    classifier's logits over the training classes (RFS's eval/meta_eval.py default, use_logit=True; the
    rfs_* protocols set it; the logistic head L2-normalizes them as it does embeddings). The SGD heads
    report the query accuracy after every pass over the support set (acc_step{k}); heads.py has the
    authors' recipes.
    """

    train_mode = "flat"
    task_kinds = ("classification",)  # a classifier over the training classes, then classifier heads per task
    throughput_metric = "train/images_per_s"

    def __init__(
        self,
        model: nn.Module,
        head: str = "linear",
        scale: float | None = None,
        num_classes: int | None = None,
        features: str = "embedding",
        fit_epochs: int = 100,
        fit_batch_size: int = 4,
        fit_lr: float = 0.01,
        fit_momentum: float = 0.9,
        fit_dampening: float = 0.9,
        fit_weight_decay: float = 0.001,
        seed: int = 0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        require_features_and_head(model, "algo=baseline")
        if head not in HEADS:
            raise ConfigError(f"algo.head={head!r} is not known: use linear (Baseline), cosine (Baseline++) or logistic (RFS-simple).")
        if features not in FEATURES:
            raise ConfigError(
                f"algo.features={features!r} is not known: use embedding (the body's output, Chen et al.) or logits "
                "(the pretraining classifier's outputs, RFS's default)."
            )
        if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise ConfigError(f"algo.scale={scale!r} is not valid: use a number > 0, or null for Chen et al.'s (2, or 10 above 200 classes).")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise ConfigError(f"algo.num_classes={num_classes!r} is not valid: use a whole number >= 2, or null for the training classes.")
        self.embedding_dim = getattr(model.head, "in_features", None)
        if not isinstance(self.embedding_dim, int):
            raise ConfigError(
                f"algo=baseline reads the embedding size from model.head.in_features, which {type(model.head).__name__} lacks: "
                "give the model a linear head (nn.Linear(embedding size, n_way))."
            )
        model.head = nn.Identity()  # model(x) is now the embedding
        super().__init__(model, optimizer, scheduler, gradient_clip_val, "auto", max_nonfinite_steps, transductive=True)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.head_type, self.scale, self.num_classes, self.features, self.seed = head, scale, num_classes, features, seed
        self.recipe = FitRecipe(fit_epochs, fit_batch_size, fit_lr, fit_momentum, fit_dampening, fit_weight_decay)
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self.build_classifier(num_classes)

    @property
    def eval_steps(self) -> int | None:
        """Passes of the SGD heads over the support set (one accuracy each); None for the logistic head (no steps)."""
        return None if self.head_type == "logistic" else self.recipe.epochs

    def batch_size_of(self, batch: dict[str, Tensor]) -> int:
        """Images in a training batch."""
        return batch["x"].shape[0]

    def build_classifier(self, outputs: int) -> None:
        """The pretraining classifier over `outputs` classes (cosine for Baseline++, else linear)."""
        self.classifier = pretraining_classifier(self.head_type, self.embedding_dim, outputs, self.scale)

    def setup(self, stage: str) -> None:
        """Build the classifier over the data's training classes, unless algo.num_classes or a loaded checkpoint built it."""
        classes = getattr(self.trainer.datamodule, "train_classes", None) if self._trainer is not None else None
        if self.classifier is None:
            if not classes:
                raise ConfigError("algo=baseline needs the number of training classes: train with FewShotDataModule, or set algo.num_classes.")
            self.build_classifier(classes)
        outputs = next(p.shape[0] for p in self.classifier.parameters())
        if classes and classes > outputs:
            raise ConfigError(f"algo.num_classes={outputs} but the data has {classes} training classes: set algo.num_classes=null (or >= {classes}).")

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Build the classifier from the checkpoint's shapes when setup() has not yet (eval.py loads weights before testing)."""
        if self.classifier is None:
            shapes = [v.shape[0] for k, v in state_dict.items() if k.startswith("classifier.")]
            if shapes:
                self.build_classifier(shapes[0])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-3), Chen et al.'s."""
        return torch.optim.Adam(params, lr=1e-3)

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Cross-entropy of the classifier on a batch of labelled images, backpropagated (DDP averages it); scores [1, 1] (accuracy)."""
        logits = self.classifier(self.model(batch["x"]))
        loss = F.cross_entropy(logits, batch["y"])
        self.manual_backward(loss)
        return TaskOutcome(loss.detach().unsqueeze(0), accuracy(logits.detach(), batch["y"]).view(1, 1), {}, logits.new_zeros(0))

    def represent(self, images: Tensor) -> Tensor:
        """What the per-task head sees of `images`: the embedding [M, D], or the pretraining classifier's logits [M, outputs]."""
        embedding = self.model(images)
        return embedding if self.features == "embedding" else self.classifier(embedding)

    def embed_tasks(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Support and query features [B, S, D] and [B, Q, D] (algo.features), each task's images as one batch, without gradients."""
        shots = batch["support_x"].shape[1]
        with torch.no_grad():
            embedded = torch.stack([self.represent(torch.cat([s, q])) for s, q in zip(batch["support_x"], batch["query_x"])])
        return embedded[:, :shots], embedded[:, shots:]

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Fit a new head per task on its support features and score its queries: scores [B, P] (accuracies; P = fit_epochs + 1, or 1 for logistic)."""
        z_support, z_query = self.embed_tasks(batch)
        support_y, query_y = batch["support_y"], batch["query_y"]
        if self.head_type == "logistic":
            logits = fit_logistic(z_support, support_y, z_query)
        else:
            n_way = int(support_y[0].max()) + 1
            generators = [task_generator(self.seed, stream, 0, task) for task in task_ids]
            with torch.enable_grad():
                logits = fit_heads(self.head_type, z_support, support_y, z_query, n_way, self.recipe, generators, self.scale)
        return outcome_of_logits(logits, query_y, keep_logits)
