"""What a task is, whatever the data: the task interface (kinds: loss and metric), rank-sharded task streams, regression families, RL task families (environments).

Image classification (metalight.data) and few-shot regression (RegressionDataModule) both build on it.
"""

from metalight.tasks.datamodule import TaskDataModule
from metalight.tasks.families import RegressionTask
from metalight.tasks.kinds import CLASSIFICATION, REGRESSION, REINFORCEMENT, TaskKind
from metalight.tasks.regression import RegressionDataModule
from metalight.tasks.rl import RLDataModule

__all__ = ["CLASSIFICATION", "REGRESSION", "REINFORCEMENT", "RLDataModule", "RegressionDataModule", "RegressionTask", "TaskDataModule", "TaskKind"]
