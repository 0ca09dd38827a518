"""Networks the meta-learners adapt: any nn.Module works, these are the ones the configs name."""

from metalight.models.conv4 import Conv4
from metalight.models.resnet12 import ResNet12

__all__ = ["Conv4", "ResNet12"]
