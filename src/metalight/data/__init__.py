"""Few-shot data: Omniglot and miniImageNet episodes as a LightningDataModule (FewShotDataModule)."""

from metalight.data.datamodule import FewShotDataModule
from metalight.data.episodes import EpisodeDataset, EvalTaskSampler, TrainTaskSampler

__all__ = ["EpisodeDataset", "EvalTaskSampler", "FewShotDataModule", "TrainTaskSampler"]
