"""Classify your own images with a trained run: `python predict.py ckpt_path=<run> support=<folder> query=<images> output=<file.csv>` (see README)."""

import hydra
from omegaconf import DictConfig

from metalight.runs.cli import run_reporting_errors
from metalight.apply.prediction import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Adapt the run to the support folder, print and save the query predictions."""
    run_reporting_errors(predict, cfg)


if __name__ == "__main__":
    main()
