"""A dynamics model for model-based RL (GrBAL, Nagabandi et al. 2019): an MLP from (observation, action) to the change of
observation, in the units of the normalization statistics it carries.

As learning_to_adapt's MetaMLPDynamicsModel: the inputs are normalized by the mean and std of the observations and
actions collected, the output is the change of observation normalized by its own mean and std, and the loss is the
MSE in those units (every dimension counts alike, whatever its scale). The statistics are buffers, not weights: the
inner loop never adapts them (split_state keeps buffers fixed), they travel with the weights in every checkpoint,
and the data module that collects the transitions sets them (set_normalization) after each collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalight.models.mlp import MLP

EPSILON = 1e-10  # learning_to_adapt's normalize(): (x - mean) / (std + 1e-10)


class DynamicsMLP(nn.Module):
    """(observation, action) [n, O + A] -> normalized change of observation [n, O]; `features`/`head` as MLP's (ANIL)."""

    def __init__(
        self, observation_dim: int, action_dim: int, hidden: Sequence[int] = (512, 512, 512), activation: str = "relu", init: str = "glorot"
    ) -> None:
        super().__init__()
        self.observation_dim, self.action_dim = observation_dim, action_dim
        net = MLP(observation_dim + action_dim, observation_dim, hidden, activation, init)
        self.features, self.head = net.features, net.head
        self.register_buffer("input_mean", torch.zeros(observation_dim + action_dim))
        self.register_buffer("input_std", torch.ones(observation_dim + action_dim))
        self.register_buffer("delta_mean", torch.zeros(observation_dim))
        self.register_buffer("delta_std", torch.ones(observation_dim))

    def forward(self, x: Tensor) -> Tensor:
        """The predicted change of observation, normalized, for raw (observation, action) rows x [..., O + A]."""
        return self.head(self.features((x - self.input_mean) / (self.input_std + EPSILON)))

    @torch.no_grad()
    def set_normalization(self, inputs: Tensor, deltas: Tensor) -> None:
        """Statistics of the (observation, action) rows [n, O + A] and their changes of observation [n, O] (std of the population, as numpy's)."""
        self.input_mean.copy_(inputs.mean(0))
        self.input_std.copy_(inputs.std(0, correction=0))
        self.delta_mean.copy_(deltas.mean(0))
        self.delta_std.copy_(deltas.std(0, correction=0))

    def normalized_delta(self, observations: Tensor, next_observations: Tensor) -> Tensor:
        """The regression target: the change of observation in the model's output units."""
        return (next_observations - observations - self.delta_mean) / (self.delta_std + EPSILON)

    def next_observation(self, observations: Tensor, normalized_delta: Tensor) -> Tensor:
        """The next observation a (normalized) predicted change leads to."""
        return observations + normalized_delta * (self.delta_std + EPSILON) + self.delta_mean
