"""Conv4Relation, the embedding of Relation Networks (Sung et al. 2018): four conv blocks whose output keeps its spatial map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from metalight.errors import ConfigError

INITS = ("sung", "default")


def sung_init_(module: nn.Module) -> None:
    """floodsung/LearningToCompare_FSL's weights_init: conv N(0, sqrt(2 / (k*k*out))) with zero bias, BatchNorm 1 and 0, linear N(0, 0.01) with bias 1."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (kh * kw * layer.out_channels)))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.ones_(layer.bias)


class Conv4Relation(nn.Module):
    """Sung et al.'s CNNEncoder: 4 x [conv3x3 -> BatchNorm -> ReLU], a 2x2 max-pool after the blocks `pool` marks, no final pooling.

    Their code (floodsung/LearningToCompare_FSL, CNNEncoder) pads the first two convs by 0 and the last two
    by 1 and pools after the first two: 28x28 Omniglot images give 64 x 5 x 5 maps, 84x84 miniImageNet
    images 64 x 19 x 19. `features` returns that map flattened, [B, hidden * side * side], and `feature_map`
    says its shape (hidden, side, side): algo=relationnet unflattens it, and the other learners take the
    vector as any model's embedding (the linear `head` to n_way, which algo=relationnet drops, reads it).
    init="sung" is their weights_init (conv weights N(0, sqrt(2 / (9 * out))), zero conv bias, BatchNorm 1/0);
    "default" keeps PyTorch's. track_running_stats=False: BatchNorm normalizes with the batch's statistics,
    in training and eval mode alike (their code never calls .eval(), so its BatchNorm always does).
    """

    def __init__(
        self,
        in_channels: int,
        n_way: int,
        hidden: int = 64,
        image_size: int = 28,
        padding: Sequence[int] = (0, 0, 1, 1),
        pool: Sequence[bool] = (True, True, False, False),
        track_running_stats: bool = False,
        init: str = "sung",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("n_way", n_way), ("hidden", hidden), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Conv4Relation {name}={value!r} is not valid: it must be a whole number >= 1.")
        padding, pool = list(padding), [bool(p) for p in pool]
        if len(padding) != 4 or len(pool) != 4 or any(p not in (0, 1) for p in padding):
            raise ConfigError(f"Conv4Relation padding={padding} and pool={pool} are not valid: give 4 paddings (0 or 1) and 4 true/false values, one per block (model.padding, model.pool).")
        if init not in INITS:
            raise ConfigError(f"Conv4Relation init={init!r} is not known: use sung (Sung et al.'s weights_init) or default (PyTorch's), model.init.")
        blocks: list[nn.Module] = []
        side, channels = image_size, in_channels
        for pad, pooled in zip(padding, pool):
            layers: list[nn.Module] = [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=pad),
                nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                nn.ReLU(),
            ]
            side = side - 2 + 2 * pad
            if pooled:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            if side < 1:
                raise ConfigError(f"Conv4Relation image_size={image_size} is too small for its convs and pools (padding={padding}, pool={pool}): use larger images.")
            blocks.append(nn.Sequential(*layers))
            channels = hidden
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.feature_map = (hidden, side, side)  # the shape of the map features(x) flattens, for algo=relationnet
        self.head = nn.Linear(hidden * side * side, n_way)
        if init == "sung":
            sung_init_(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_way] of images [batch, in_channels, image_size, image_size]."""
        return self.head(self.features(x))
