"""Few-shot data: Omniglot, miniImageNet, CIFAR-FS, FC100, tieredImageNet, CUB and your own folders as episodes (FewShotDataModule)."""

from metalight.data.datamodule import FewShotDataModule
from metalight.data.episodes import EpisodeDataset
from metalight.tasks.samplers import EvalTaskSampler, TrainTaskSampler

__all__ = ["EpisodeDataset", "EvalTaskSampler", "FewShotDataModule", "TrainTaskSampler"]
