"""ResNet-12, the residual network of the few-shot literature since TADAM and MetaOptNet (Lee et al. 2019).

Four residual blocks of 3 x [conv3x3 -> BatchNorm -> LeakyReLU(0.1)] (no activation after the third
BatchNorm), a 1x1 conv + BatchNorm shortcut, the sum through LeakyReLU and a 2x2 max-pool; 64-160-320-640
channels. Differences from MetaOptNet's `ResNet12_embedding.py` (and RFS's `resnet.py`, the same network):
* the embedding is the spatial mean of the last feature map (640-d, RFS's `avg_pool=True`); MetaOptNet
  flattens it (640 x 5 x 5 on 84x84 images);
* their DropBlock rate ramps linearly from 0 over the first 40,000 forward calls of each block, a counter
  kept outside the state dict; ours is constant (`drop_rate` from the first step), so it survives a resume;
* our DropBlock zeroes each seed's whole size x size block. Theirs (MetaOptNet's models/dropblock.py, which
  RFS copies) pairs the list of seeds with the list of size^2 offsets by tiling each list separately, so
  entry r joins seed r mod n to offset r mod size^2 (n: the seeds drawn in the whole batch): every seed gets
  every offset only when n shares no factor with size^2, and otherwise some of them. At rate 0.1 on batches
  of 64 (an independent simulation) theirs drops 1.16-1.25x fewer units than full blocks with size 5 on
  miniImageNet's 10x10 and 5x5 maps and about 1.43x fewer with size 2 on CIFAR's 4x4 and 2x2, both
  rescaling the kept units per pass; it is a difference of regularization strength, not measured in accuracy;
* BatchNorm keeps no running statistics unless `track_running_stats` (as model=conv4), so that MAML's
  inner loop and vmap path can use it.
The parameter count is theirs: 12,424,320 in the body with 3 input channels (tests/test_models_resnet12.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metalight.errors import ConfigError
from metalight.models.conv4 import SpatialMean

LEAK = 0.1  # LeakyReLU's negative slope in MetaOptNet and RFS


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero square blocks of each feature map and rescale the rest.

    `rate` is the fraction of units to drop; block seeds are drawn with MetaOptNet's probability
    rate / size^2 * H * W / ((H - size + 1) * (W - size + 1)), so blocks cover about that fraction (overlaps
    aside). Each seed drops its full block, which MetaOptNet's own DropBlock does not always do (the module
    docstring). A block larger than the map shrinks to it (CIFAR's 2x2 maps under MetaOptNet's size 5). The
    identity in eval mode.
    """

    def __init__(self, rate: float, block_size: int) -> None:
        super().__init__()
        self.rate, self.block_size = rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x with blocks dropped (training) or unchanged (eval)."""
        if not self.training:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        rows, columns = height - size + 1, width - size + 1
        gamma = self.rate / size**2 * height * width / (rows * columns)
        seeds = (torch.rand_like(x[..., :rows, :columns]) < gamma).to(x.dtype)  # rand_like: per task under vmap
        # a seed at (i, j) drops rows i..i+size-1 and columns j..j+size-1 of the map
        dropped = F.max_pool2d(F.pad(seeds, [size - 1] * 4), size, stride=1)
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1))


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, track_running_stats: bool) -> list[nn.Module]:
    """conv (no bias: BatchNorm follows) -> BatchNorm."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
    ]


class ResidualBlock(nn.Module):
    """3 x [conv3x3 -> BatchNorm] with LeakyReLU between them, plus a 1x1 conv + BatchNorm shortcut; then LeakyReLU, 2x2 max-pool, dropout."""

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool, drop: nn.Module) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += _conv_norm(in_channels if i == 0 else out_channels, out_channels, 3, track_running_stats)
            if i < 2:
                layers.append(nn.LeakyReLU(LEAK))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(*_conv_norm(in_channels, out_channels, 1, track_running_stats))
        self.out = nn.Sequential(nn.LeakyReLU(LEAK), nn.MaxPool2d(2), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps at half the resolution."""
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 body (`features`: images -> spatial mean of the last block, [B, channels[-1]]) and a linear `head` to n_way.

    drop_rate > 0 drops where MetaOptNet does: dropout after the first two blocks, DropBlock of
    dropblock_size after the last two (MetaOptNet and RFS: drop_rate=0.1, dropblock_size=5 on
    miniImageNet and tieredImageNet, 2 on CIFAR-FS/FC100). Not as they do: our DropBlock drops whole
    blocks at a constant rate, theirs fewer units at a rate ramped over 40,000 passes (the module
    docstring says how many). `channels` sets the four widths (tiny ones for tests).
    """

    def __init__(
        self,
        in_channels: int,
        n_way: int,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if len(channels) != 4:
            raise ConfigError(f"model.channels={channels} is not valid: ResNet-12 has 4 blocks, give 4 widths, e.g. [64,160,320,640].")
        named = [("in_channels", in_channels), ("n_way", n_way), ("image_size", image_size), ("dropblock_size", dropblock_size)]
        for name, value in named + [(f"channels[{i}]", c) for i, c in enumerate(channels)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}={value!r} is not valid: it must be a whole number >= 1.")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ConfigError(f"model.drop_rate={drop_rate!r} is not valid: use a number in [0, 1), e.g. 0.1 (MetaOptNet) or 0 (off).")
        if image_size < 16:
            raise ConfigError(f"model.image_size={image_size} is too small for ResNet-12's four 2x2 max-pools (needs >= 16): use larger images.")
        blocks = []
        for i, (c_in, c_out) in enumerate(zip([in_channels] + channels, channels)):
            if drop_rate == 0:
                drop: nn.Module = nn.Identity()
            else:
                drop = nn.Dropout(drop_rate) if i < 2 else DropBlock(drop_rate, dropblock_size)
            blocks.append(ResidualBlock(c_in, c_out, track_running_stats, drop))
        self.features = nn.Sequential(*blocks, SpatialMean())
        self.head = nn.Linear(channels[-1], n_way)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):  # the references' initialization
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_way] of images [batch, in_channels, H, W] (H, W >= 16)."""
        return self.head(self.features(x))
