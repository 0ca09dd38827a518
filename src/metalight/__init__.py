"""metalight: few-shot meta-learners (MAML and its family, Reptile, ProtoNets) as Lightning modules with Hydra configs.

`metalight.FewShotLearner` applies a trained run to your own task (README, Use a trained learner); it is
imported on first use, so `import metalight` stays light.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """metalight.FewShotLearner, imported when first asked for (it pulls in torch, Lightning and Hydra)."""
    if name == "FewShotLearner":
        from metalight.apply.learner import FewShotLearner

        return FewShotLearner
    raise AttributeError(f"module 'metalight' has no attribute {name!r}")
