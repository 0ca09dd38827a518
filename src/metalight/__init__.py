"""metalight: MAML, first-order MAML and Reptile as Lightning modules with Hydra configs."""

__version__ = "0.1.0"
