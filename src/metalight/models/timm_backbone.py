"""Any timm network as the body of a few-shot model: `model=timm model.name=<timm model> model.pretrained=<bool>`."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from metalight.errors import ConfigError


class TimmBackbone(nn.Module):
    """timm.create_model(name, pretrained, num_classes=0, in_chans) as `features` (images -> pooled embedding), a linear `head` to n_way.

    Pretrained weights come from the Hugging Face hub (or timm's URLs) into the local cache (HF_HOME,
    TORCH_HOME) on first use; later runs, offline ones included, read the cache. A 1-channel input
    sums the pretrained stem over RGB (timm's in_chans). track_running_stats=False removes BatchNorm's
    running statistics (pretrained ones included): batch statistics in training and evaluation alike,
    as model=conv4, which MAML's vmap path needs; keep them with pretrained weights.
    """

    def __init__(self, name: str, in_channels: int, n_way: int, pretrained: bool = False, track_running_stats: bool = True) -> None:
        import timm  # here, not at the top: importing timm takes seconds, and only runs that use it should pay

        super().__init__()
        if not isinstance(name, str) or not timm.is_model(name):
            close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(
                f"model.name={name!r} is not a timm model: {hint}Set model.name to one of timm.list_models() "
                "(e.g. `python -c \"import timm; print(timm.list_models('resnet*'))\"`)."
            )
        if pretrained and not timm.is_model_pretrained(name):
            raise ConfigError(
                f"model.pretrained=true, but timm has no pretrained weights for {name}: set model.pretrained=false, "
                "or a model.name from timm.list_models(pretrained=True)."
            )
        try:
            self.features = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels)
        except OSError as error:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError: offline, nothing cached
            if not pretrained:
                raise
            raise ConfigError(
                f"model.pretrained=true: the weights of {name} are not in the local cache and could not be downloaded "
                f"({type(error).__name__}): run once with internet access (offline runs then read the cache under HF_HOME), "
                "or set model.pretrained=false."
            ) from None
        if not track_running_stats:
            _drop_running_statistics(self.features)
        self.head = nn.Linear(self.features.num_features, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_way] of images [batch, in_channels, H, W]."""
        return self.head(self.features(x))


def _drop_running_statistics(module: nn.Module) -> None:
    """Make every BatchNorm of `module` (timm's fused BatchNormAct2d included) normalize with batch statistics only."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.track_running_stats = False
            norm.running_mean = norm.running_var = norm.num_batches_tracked = None
