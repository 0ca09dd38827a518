"""A fully connected network for vector tasks (few-shot regression): MAML's 1-40-40-1 ReLU net by default."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metalight.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
INITS = ("finn", "glorot", "default")


class MLP(nn.Module):
    """in_features -> hidden... (each Linear + activation) -> out_features; `features` is the body, `head` the last Linear.

    init="finn": weights from a normal of std 0.01 truncated at two standard deviations, biases 0, as
    cbfinn/maml's construct_fc_weights draws them (tf.truncated_normal(stddev=0.01)); "glorot": Glorot-uniform weights,
    biases 0 (TensorFlow's xavier_initializer, learning_to_adapt's dynamics models); "default": PyTorch's.
    The body/head split lets ANIL adapt only the head, as on images.
    """

    def __init__(
        self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40), activation: str = "relu", init: str = "finn"
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        for value in widths:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MLP widths {widths} must all be whole numbers >= 1: check model.hidden and data.input_dim / data.output_dim.")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r} is not known: use one of {', '.join(ACTIVATIONS)}.")
        if init not in INITS:
            raise ConfigError(f"model.init={init!r} is not known: use finn (cbfinn/maml's truncated normal, std 0.01), glorot (Glorot-uniform, zero biases) or default (PyTorch's).")
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-2], widths[-1])
        if init == "finn":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(layer.bias)
        if init == "glorot":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions [n, out_features] of inputs [n, in_features]."""
        return self.head(self.features(x))
