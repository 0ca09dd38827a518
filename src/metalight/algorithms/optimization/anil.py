"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): MAML whose inner loop adapts only the head."""

from __future__ import annotations

from typing import Any

from torch import nn

from metalight.algorithms.base import require_features_and_head
from metalight.algorithms.optimization.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop: the body (model.features) is run once per task and only model.head is adapted.

    The outer step still updates body and head: the meta-gradient reaches the body through the
    embeddings the head was adapted on (second order) and the query embeddings. Every MAML option
    applies (inner_lr, inner_steps, first_order, ...). Needs a model with a separable head: a
    `features` module (images -> embeddings) and a `head` module, forward = head(features(x)).
    """

    def __init__(self, model: nn.Module, **maml_options: Any) -> None:
        require_features_and_head(model, "ANIL")
        super().__init__(model, **maml_options)
        self.head_weights = frozenset(name for name, p in model.named_parameters() if p.requires_grad and name.startswith("head."))

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Adapt the head only, on embeddings computed once per task."""
        return {"adapted": self.head_weights, "body": "features"}
