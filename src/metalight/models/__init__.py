"""Networks the meta-learners adapt: any nn.Module works, these are the ones the configs name."""

from metalight.models.conv4 import Conv4

__all__ = ["Conv4"]
