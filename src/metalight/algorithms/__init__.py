"""Meta-learning algorithms as LightningModules on one base (EpisodicModule).

Gradient-based: MAML / first-order MAML, and on its meta-step ANIL, Meta-SGD and MAML++; Reptile;
metric-based: Prototypical Networks; model-based: SNAIL; pretrain-then-fit: Baseline, Baseline++ and RFS-simple;
reinforcement learning: MAML-RL with a TRPO outer step, or with ProMP's PPO outer step; RL² (a recurrent policy, PPO on whole trials).
"""

from metalight.algorithms.anil import ANIL
from metalight.algorithms.base import EpisodicModule, NonFiniteMetaStepError
from metalight.algorithms.baseline import Baseline
from metalight.algorithms.cnp import CNP
from metalight.algorithms.maml import MAML
from metalight.algorithms.maml_ppo import MAMLPPO
from metalight.algorithms.maml_rl import MAMLRL
from metalight.algorithms.mamlpp import MAMLpp
from metalight.algorithms.matchingnet import MatchingNet
from metalight.algorithms.metasgd import MetaSGD
from metalight.algorithms.protonet import ProtoNet
from metalight.algorithms.relationnet import RelationNet
from metalight.algorithms.reptile import Reptile
from metalight.algorithms.snail import SNAIL
from metalight.algorithms.rl2 import RL2
from metalight.algorithms.trpo import TRPO

__all__ = ["ANIL", "CNP", "MAML", "MAMLPPO", "MAMLRL", "TRPO", "Baseline", "MAMLpp", "EpisodicModule", "MatchingNet", "MetaSGD", "NonFiniteMetaStepError", "ProtoNet", "RelationNet", "Reptile", "RL2", "SNAIL"]
