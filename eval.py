"""Score a checkpoint on the fixed test tasks: `python eval.py ckpt_path=logs/.../checkpoints/last.ckpt` (see README)."""

import hydra
from omegaconf import DictConfig

from metalight.runs.cli import run_reporting_errors
from metalight.apply.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Evaluate one checkpoint and save its results beside it."""
    run_reporting_errors(evaluate, cfg)


if __name__ == "__main__":
    main()
