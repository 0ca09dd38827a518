"""Classifiers on embeddings: Baseline++'s cosine classifier, and the heads fitted on each task's support set.

Chen et al. 2019 (wyharveychen/CloserLookFewShot, methods/baselinefinetune.py) drop the pretraining head and
fit a new linear or cosine one per task on the support embeddings: 100 passes over the support set in
shuffled minibatches of 4, torch's SGD with lr 0.01, momentum 0.9, dampening 0.9 and weight decay 0.001
(so 200 steps for 5-way 1-shot, 700 for 5-shot), from nn.Linear's random initialization. Tian et al. 2020
(WangYueFt/rfs, eval/meta_eval.py) L2-normalize the features and fit scikit-learn's
LogisticRegression(random_state=0, solver="lbfgs", max_iter=1000), multinomial with C=1. Their features are by
default (meta_test's use_logit=True) the pretraining network's logits over the 64 training classes, not its
640-d embedding; eval_fewshot.py reports both. Baseline's `features` (algo.features=logits|embedding) chooses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.errors import ConfigError

HEADS = ("linear", "cosine", "logistic")
FEATURES = ("embedding", "logits")


def cosine_scale(outputs: int) -> float:
    """Chen et al.'s fixed scale of the cosine logits: 2 for up to 200 classes, 10 above (Omniglot's thousands)."""
    return 2.0 if outputs <= 200 else 10.0


def cosine_logits(x: Tensor, direction: Tensor, gain: Tensor, scale: float) -> Tensor:
    """scale * gain_c * cos(x, direction_c), for x [..., M, D], direction [..., N, D], gain [..., N]: logits [..., M, N].

    Chen et al.'s distLinear: a linear layer without bias, weight-normalized per class (direction and a
    learned norm, torch's WeightNorm), applied to x / (||x|| + 1e-5).
    """
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    weight = gain.unsqueeze(-1) * direction / direction.norm(dim=-1, keepdim=True)
    return scale * x @ weight.transpose(-1, -2)


def _linear_init(outputs: int, dim: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """nn.Linear's initialization (weight and bias uniform in +-1/sqrt(dim)), drawn from `generator`."""
    bound = 1.0 / math.sqrt(dim)
    weight = (torch.rand(outputs, dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(outputs, generator=generator) * 2 - 1) * bound
    return weight, bias


class CosineClassifier(nn.Module):
    """Baseline++'s classifier over `outputs` classes: cosine_logits with a learned norm per class, initialized as nn.Linear."""

    def __init__(self, dim: int, outputs: int, scale: float | None = None) -> None:
        super().__init__()
        direction, _ = _linear_init(outputs, dim)
        self.direction = nn.Parameter(direction)
        self.gain = nn.Parameter(direction.norm(dim=1))  # WeightNorm starts at the initial weight's norm
        self.scale = cosine_scale(outputs) if scale is None else float(scale)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [M, outputs] of embeddings [M, dim]."""
        return cosine_logits(x, self.direction, self.gain, self.scale)


def pretraining_classifier(head: str, dim: int, outputs: int, scale: float | None) -> nn.Module:
    """The classifier pretrained with the body: cosine for Baseline++, linear with a zero bias (Chen et al.) otherwise."""
    if head == "cosine":
        return CosineClassifier(dim, outputs, scale)
    linear = nn.Linear(dim, outputs)
    nn.init.zeros_(linear.bias)
    return linear


@dataclass(frozen=True)
class FitRecipe:
    """How a linear or cosine head is fitted on a task's support embeddings (Chen et al.'s values by default)."""

    epochs: int = 100
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 0.001

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"algo.fit_{name}={value!r} is not valid: use a whole number >= 1 (Chen et al.: {getattr(FitRecipe, name)}).")
        if not self.lr > 0:
            raise ConfigError(f"algo.fit_lr={self.lr!r} is not valid: use a number > 0 (Chen et al.: 0.01).")
        for name in ("momentum", "dampening", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"algo.fit_{name}={getattr(self, name)!r} is not valid: use a number >= 0.")


def fit_heads(
    head: str, z_support: Tensor, y_support: Tensor, z_query: Tensor, n_way: int, recipe: FitRecipe, generators: Sequence[torch.Generator], scale: float | None = None
) -> Tensor:
    """Fit a fresh linear or cosine head per task and return the query logits after every pass, [B, epochs + 1, Q, N].

    z_support [B, S, D], y_support [B, S], z_query [B, Q, D]; column 0 is the untrained head. Task b's
    initialization and minibatch order come from generators[b] alone, so a task's head does not depend on
    the other tasks of its batch. The B heads are fitted together as one batched parameter per weight:
    the loss is the sum of the tasks' mean cross-entropies, so each task's gradient is its own.
    """
    tasks, support, dim = z_support.shape
    scale = cosine_scale(n_way) if scale is None else scale
    initial = [_linear_init(n_way, dim, generator) for generator in generators]
    weight = torch.stack([w for w, _ in initial]).to(z_support)
    second = torch.stack([b for _, b in initial]).to(z_support) if head == "linear" else weight.norm(dim=-1)
    params = [weight.requires_grad_(), second.requires_grad_()]
    orders = torch.stack([torch.stack([torch.randperm(support, generator=g) for _ in range(recipe.epochs)]) for g in generators]).to(z_support.device)
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, dampening=recipe.dampening, weight_decay=recipe.weight_decay)

    def logits(z: Tensor) -> Tensor:
        if head == "linear":
            return z @ params[0].transpose(-1, -2) + params[1].unsqueeze(-2)
        return cosine_logits(z, params[0], params[1], scale)

    with torch.no_grad():
        recorded = [logits(z_query)]
    for epoch in range(recipe.epochs):
        for first in range(0, support, recipe.batch_size):
            rows = orders[:, epoch, first : first + recipe.batch_size]
            z = torch.gather(z_support, 1, rows.unsqueeze(-1).expand(-1, -1, dim))
            y = torch.gather(y_support, 1, rows)
            optimizer.zero_grad()
            losses = F.cross_entropy(logits(z).flatten(0, 1), y.flatten(), reduction="none").view(tasks, -1)
            losses.mean(dim=1).sum().backward()
            optimizer.step()
        with torch.no_grad():
            recorded.append(logits(z_query))
    return torch.stack(recorded, dim=1)


def fit_logistic(z_support: Tensor, y_support: Tensor, z_query: Tensor) -> Tensor:
    """RFS's classifier per task on L2-normalized features (embeddings or logits): the query log-probabilities [B, 1, Q, N] (deterministic)."""
    from sklearn.linear_model import LogisticRegression  # imported here: only algo.head=logistic needs scikit-learn

    support = F.normalize(z_support, dim=-1).double().cpu().numpy()
    query = F.normalize(z_query, dim=-1).double().cpu().numpy()
    labels = y_support.cpu().numpy()
    scores = [
        LogisticRegression(random_state=0, solver="lbfgs", max_iter=1000).fit(s, y).predict_log_proba(q)
        for s, y, q in zip(support, labels, query)
    ]
    return torch.from_numpy(np.stack(scores)).to(z_query).unsqueeze(1)
