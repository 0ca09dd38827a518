"""Networks the meta-learners adapt: any nn.Module works, these are the ones the configs name."""

from metalight.models.cnp import CNPNetwork
from metalight.models.conv4 import Conv4
from metalight.models.dynamics import DynamicsMLP
from metalight.models.gaussian_gru import GaussianGRU
from metalight.models.gaussian_mlp import GaussianMLP
from metalight.models.mlp import MLP
from metalight.models.resnet12 import ResNet12
from metalight.models.timm_backbone import TimmBackbone

__all__ = ["MLP", "CNPNetwork", "Conv4", "DynamicsMLP", "GaussianGRU", "GaussianMLP", "ResNet12", "TimmBackbone"]
