"""Train a meta-learner: `python train.py algo=reptile data=omniglot trainer.devices=2` (see README)."""

import hydra
from omegaconf import DictConfig

from metalight.runs.cli import run_reporting_errors
from metalight.runs.launch import pin_hydra_for_ddp_children
from metalight.runs.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train (and test) one configuration; return the metric a sweeper optimizes."""
    pin_hydra_for_ddp_children()
    metrics, _ = run_reporting_errors(train, cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
