"""Conv4, the four-block convolutional network of the few-shot literature, in its pooled and strided forms."""

from __future__ import annotations

import math

import torch
from torch import nn

from metalight.errors import ConfigError


ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01)}
READOUTS = ("mean", "flatten")
INITS = ("default", "he_fan_out")


def _block(in_channels: int, out_channels: int, pool: bool, track_running_stats: bool, activation: str) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> activation, then a 2x2 max-pool (pool=True) or with the conv striding by 2 (pool=False)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1 if pool else 2, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        ACTIVATIONS[activation](),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def he_fan_out_(module: nn.Module) -> None:
    """Chen et al.'s init_layer on every conv and BatchNorm in `module`: conv weights N(0, sqrt(2 / fan_out)), BatchNorm 1 and 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (kh * kw * layer.out_channels)))
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class SpatialMean(nn.Module):
    """Feature maps [B, C, H, W] -> their mean over H and W, [B, C] (MAML's Omniglot net pools this way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average over the two spatial dimensions."""
        return x.mean(dim=(2, 3))


class Conv4(nn.Module):
    """Four conv blocks and a linear head to `n_way` logits (Vinyals et al. 2016; Finn et al. 2017).

    pool=True:  4 x [conv3x3 pad 1 -> BN -> ReLU -> maxpool 2], flatten, linear (MAML's miniImageNet net).
    pool=False: 4 x [conv3x3 stride 2 pad 1 -> BN -> ReLU], spatial mean, linear (MAML's Omniglot net);
    readout: "flatten" or "mean" over the last feature map; None is the net's usual one (flatten when
    pooled; mean when strided). supervised-reptile's Omniglot net is the strided one with "flatten"
    (2x2x64 = 256 features from 28x28 images).
    init="he_fan_out" draws each conv weight from N(0, sqrt(2 / (k * k * out_channels))) and sets BatchNorm's
    weight to 1 and bias to 0 (Chen et al.'s `init_layer`, wyharveychen/CloserLookFewShot backbone.py; the conv
    biases and the head keep PyTorch's initialization, as theirs do); "default" leaves PyTorch's own (uniform
    in +-1/sqrt(k * k * in_channels)), the weights every other protocol was written with.
    activation="leaky_relu" (slope 0.01, F.leaky_relu's default) is the MAML++ authors' network.
    `features` maps images to embeddings and `head` embeddings to logits (forward = head(features(x))):
    the split ANIL adapts across and ProtoNets embed with. track_running_stats=False makes BatchNorm
    normalize with the statistics of the batch it is given, in training and in eval mode alike, so
    nothing carries over from one task to the next.
    """

    def __init__(
        self,
        in_channels: int,
        n_way: int,
        hidden: int = 64,
        image_size: int = 28,
        pool: bool = True,
        track_running_stats: bool = False,
        activation: str = "relu",
        readout: str | None = None,
        init: str = "default",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("n_way", n_way), ("hidden", hidden), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Conv4 {name}={value!r} is not valid: it must be a whole number >= 1.")
        if pool and image_size < 16:
            raise ConfigError(
                f"Conv4 image_size={image_size} is too small for four 2x2 max-pools (needs >= 16): "
                "use model=conv4_strided or larger images."
            )
        if activation not in ACTIVATIONS:
            raise ConfigError(f"Conv4 activation={activation!r} is not known: use one of {sorted(ACTIVATIONS)} (model.activation).")
        if readout is None:
            readout = "flatten" if pool else "mean"
        if readout not in READOUTS:
            raise ConfigError(f"Conv4 readout={readout!r} is not known: use one of {READOUTS}, or null for the net's usual one (model.readout).")
        if init not in INITS:
            raise ConfigError(f"Conv4 init={init!r} is not known: use default (PyTorch's) or he_fan_out (Chen et al.'s), model.init.")
        channels = [in_channels] + [hidden] * 4
        blocks = [_block(c_in, c_out, pool, track_running_stats, activation) for c_in, c_out in zip(channels, channels[1:])]
        flatten = readout == "flatten"
        self.features = nn.Sequential(*blocks, nn.Flatten() if flatten else SpatialMean())
        side = image_size
        for _ in range(4):
            side = side // 2 if pool else (side + 1) // 2
        self.head = nn.Linear(hidden * side * side if flatten else hidden, n_way)
        if init == "he_fan_out":
            he_fan_out_(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_way] of images [batch, in_channels, image_size, image_size]."""
        return self.head(self.features(x))
