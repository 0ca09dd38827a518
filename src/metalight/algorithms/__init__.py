"""Meta-learning algorithms as LightningModules: MAML / first-order MAML and Reptile on a shared base."""

from metalight.algorithms.base import EpisodicModule, NonFiniteMetaStepError
from metalight.algorithms.maml import MAML
from metalight.algorithms.reptile import Reptile

__all__ = ["MAML", "EpisodicModule", "NonFiniteMetaStepError", "Reptile"]
