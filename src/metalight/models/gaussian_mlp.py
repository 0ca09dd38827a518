"""A Gaussian policy for continuous actions: an MLP for the mean and a state-independent log standard deviation (Finn et al. 2017, §5.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalight.errors import ConfigError
from metalight.models.mlp import ACTIVATIONS


class GaussianMLP(nn.Module):
    """pi(a|s) = N(mean(s), diag(std^2)): mean from in_features -> hidden... -> out_features, one learned log-std per action dimension.

    As MAML's policies (rllab's GaussianMLPPolicy, pytorch-maml-rl's NormalMLPPolicy): 2 x 100 ReLU by
    default, Glorot-uniform weights and zero biases, std starting at init_std (1.0) and kept above min_std.
    forward returns (mean [..., out_features], std [out_features]).
    """

    def __init__(
        self,
        in_features: int = 2,
        out_features: int = 2,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        init_std: float = 1.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(hidden, Sequence) or isinstance(hidden, str):
            raise ConfigError(f"model.hidden={hidden!r} must be a list of layer widths, e.g. [100, 100].")
        widths = [in_features, *hidden, out_features]
        for value in widths:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"policy widths {widths} must all be whole numbers >= 1: check model.hidden, model.in_features and model.out_features.")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r} is not known: use one of {', '.join(ACTIVATIONS)}.")
        if not (init_std > 0 and min_std > 0):
            raise ConfigError(f"model.init_std={init_std!r} and model.min_std={min_std!r} must be numbers > 0.")
        self.in_features, self.out_features = in_features, out_features
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        self.mean = nn.Sequential(*layers[:-1])  # no activation after the last layer
        for layer in self.mean:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((out_features,), math.log(init_std)))
        self.min_log_std = math.log(min_std)

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        """The action distribution's mean [..., out_features] and std [out_features] at observations [..., in_features]."""
        return self.mean(observations), self.log_std.clamp(min=self.min_log_std).exp()
