"""The Conditional Neural Process network (Garnelo et al. 2018): a set encoder and a Gaussian decoder, used by algo=cnp."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.errors import ConfigError

INITS = ("glorot", "default")


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers through `widths`, ReLU between them and none after the last (the reference's encoder and decoder)."""
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(width_in, width_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


class CNPNetwork(nn.Module):
    """h over each support pair (x, y), mean-aggregated to r; g over (r, x_query) to a Gaussian mean and std per target.

    Shapes carry any leading (task) dimensions: support_x [..., K, in_features], support_y [..., K,
    out_features], query_x [..., Q, in_features] -> mean and std [..., Q, out_features]. The widths are
    DeepMind's reference notebook's (conditional_neural_process.ipynb): encoder [128, 128, 128, 128] (the
    last is r), decoder [128, 128] then 2 * out_features, std = min_std + (1 - min_std) * softplus (0.1 +
    0.9 softplus there). init="glorot": Glorot-uniform weights and zero biases, as tf.layers.dense there.
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        encoder: Sequence[int] = (128, 128, 128, 128),
        decoder: Sequence[int] = (128, 128),
        min_std: float = 0.1,
        init: str = "glorot",
    ) -> None:
        super().__init__()
        encoder, decoder = list(encoder), list(decoder)
        widths = [in_features, out_features, *encoder, *decoder]
        if not encoder or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(
                f"CNP widths must be whole numbers >= 1 and model.encoder must not be empty: got model.encoder={encoder}, "
                f"model.decoder={decoder}, in/out features {in_features}/{out_features} (data.input_dim / data.output_dim)."
            )
        if isinstance(min_std, bool) or not isinstance(min_std, (int, float)) or not 0 <= min_std < 1:
            raise ConfigError(f"model.min_std={min_std!r} is not valid: give a number in [0, 1) (the reference: 0.1).")
        if init not in INITS:
            raise ConfigError(f"model.init={init!r} is not known: use glorot (the reference's Glorot-uniform weights, zero biases) or default (PyTorch's).")
        self.in_features, self.out_features, self.min_std = in_features, out_features, float(min_std)
        self.encoder = _mlp([in_features + out_features, *encoder])
        self.decoder = _mlp([encoder[-1] + in_features, *decoder, 2 * out_features])
        if init == "glorot":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def represent(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """r [..., r_dim]: the mean of h(x, y) over the support pairs (a function of the set, whatever its order)."""
        return self.encoder(torch.cat([support_x, support_y], dim=-1)).mean(dim=-2)

    def decode(self, representation: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std [..., Q, out_features] at the query inputs given r."""
        r = representation.unsqueeze(-2).expand(*query_x.shape[:-1], representation.shape[-1])
        mean, raw_std = self.decoder(torch.cat([r, query_x], dim=-1)).split(self.out_features, dim=-1)
        return mean, self.min_std + (1 - self.min_std) * F.softplus(raw_std)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and std at query_x given the support set (module docstring for shapes)."""
        return self.decode(self.represent(support_x, support_y), query_x)
