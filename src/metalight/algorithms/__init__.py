"""Meta-learning algorithms as LightningModules on one base (base.py: EpisodicModule), one subpackage per family.

optimization/  adapt by gradient steps: MAML / first-order MAML, ANIL, Meta-SGD, MAML++, Reptile; the functional core
metric/        compare embeddings: Prototypical, Matching and Relation Networks
model_based/   read the support set as input, no test-time gradient step: CNPs, SNAIL, RL²
rl/            reinforcement learning's outer steps (policy gradient, TRPO, PPO) and MAML-RL / MAML-PPO on them
baselines/     no meta-training: Baseline, Baseline++ and RFS-simple, with their per-task heads

Imports run one way: optimization/functional.py (the functional core: parameters as dicts, vmapped inner loops)
imports no learner; base.py builds on it; every family builds on both; model_based's SNAIL on metric's shared
meta-step and RL² on rl's PPO; nothing imports model_based. Every learner is also exported here
(metalight.algorithms.MAML, ...), the names the configs' `_target_`s use.
"""

from metalight.algorithms.base import EpisodicModule, NonFiniteMetaStepError
from metalight.algorithms.baselines.baseline import Baseline
from metalight.algorithms.metric.matchingnet import MatchingNet
from metalight.algorithms.metric.protonet import ProtoNet
from metalight.algorithms.metric.relationnet import RelationNet
from metalight.algorithms.model_based.cnp import CNP
from metalight.algorithms.model_based.rl2 import RL2
from metalight.algorithms.model_based.snail import SNAIL
from metalight.algorithms.optimization.anil import ANIL
from metalight.algorithms.optimization.maml import MAML
from metalight.algorithms.optimization.mamlpp import MAMLpp
from metalight.algorithms.optimization.metasgd import MetaSGD
from metalight.algorithms.optimization.reptile import Reptile
from metalight.algorithms.rl.maml_ppo import MAMLPPO
from metalight.algorithms.rl.maml_rl import MAMLRL
from metalight.algorithms.rl.trpo import TRPO

__all__ = ["ANIL", "CNP", "MAML", "MAMLPPO", "MAMLRL", "TRPO", "Baseline", "MAMLpp", "EpisodicModule", "MatchingNet", "MetaSGD", "NonFiniteMetaStepError", "ProtoNet", "RelationNet", "Reptile", "RL2", "SNAIL"]
