"""Few-shot regression: tasks drawn from a family of functions (data=sinusoid, harmonic, sine_and_line, or your own)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from metalight.errors import ConfigError
from metalight.tasks.datamodule import TaskDataModule, check_whole_number, plain_dict
from metalight.tasks.families import RegressionTask, check_range, import_callable
from metalight.tasks.kinds import REGRESSION, TaskKind, regression_loss
from metalight.tasks.samplers import Key

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_FAMILY_HINT = "a dotted path to a function (rng: numpy.random.Generator, **data.family_options) -> task, e.g. metalight.tasks.families.sinusoid"


class FunctionTasks(Dataset):
    """A split as regression tasks: dataset[[(epoch, index), ...]] is the meta-batch of those tasks, float32 tensors.

    Task (epoch, index) is drawn from numpy's generator seeded with (seed, split, epoch, index): the
    family draws its function, then k_shot + k_query inputs are drawn (the first k_shot are the
    support set) and their targets computed, plus N(0, noise_std^2) noise when noise_std > 0.
    """

    def __init__(self, draw: Any, split: str, seed: int, k_shot: int, k_query: int, x_range: tuple[float, float], input_dim: int, noise_std: float) -> None:
        self.draw, self.split, self.seed = draw, split, seed
        self.k_shot, self.k_query, self.x_range, self.input_dim, self.noise_std = k_shot, k_query, x_range, input_dim, noise_std

    def task(self, epoch: int, index: int) -> tuple[RegressionTask, np.random.Generator]:
        """The task (epoch, index) and the generator its inputs are drawn from next."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], epoch, index])
        return self.draw(rng), rng

    def points(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """x [k_shot + k_query, input_dim] and noisy y [k_shot + k_query, output_dim] of task (epoch, index)."""
        task, rng = self.task(epoch, index)
        n = self.k_shot + self.k_query
        x = task.inputs(rng, n) if task.inputs is not None else rng.uniform(*self.x_range, size=(n, self.input_dim))
        y = np.asarray(task.function(x), dtype=np.float64)
        if self.noise_std > 0:
            y = y + rng.normal(0.0, self.noise_std, size=y.shape)
        return x, y

    def __getitem__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        """support_x [B, K, input_dim], support_y [B, K, output_dim], query_x [B, Q, input_dim], query_y [B, Q, output_dim]."""
        xs, ys = zip(*(self.points(epoch, index) for epoch, index in keys))
        x = torch.from_numpy(np.stack(xs)).float()
        y = torch.from_numpy(np.stack(ys)).float()
        return {"support_x": x[:, : self.k_shot], "support_y": y[:, : self.k_shot], "query_x": x[:, self.k_shot :], "query_y": y[:, self.k_shot :]}


class RegressionDataModule(TaskDataModule):
    """Meta-batches of few-shot regression tasks from `family` (a dotted path), each k_shot support and k_query query points.

    Batches are dicts of float32 tensors: support_x [B, K, input_dim], support_y [B, K, output_dim],
    query_x [B, Q, input_dim], query_y [B, Q, output_dim]. Training task i of epoch e is a function
    of (seed, "train", e, i); validation and test are the fixed tasks 0..n-1 of eval_seed. The learner
    minimizes `loss` (mse, l1, huber or a dotted path) and reports the query MSE after every inner step.
    Every option is checked, and the family drawn once and its shapes checked, when the module is built.
    """

    kind = REGRESSION  # the instance's own when data.loss is another loss

    def __init__(
        self,
        family: str,
        family_options: Mapping | None = None,
        x_range: Sequence[float] = (-5.0, 5.0),
        input_dim: int = 1,
        output_dim: int = 1,
        noise_std: float = 0.0,
        loss: str = "mse",
        k_shot: int = 10,
        k_query: int = 10,
        k_shot_train: int | None = None,
        k_query_train: int | None = None,
        meta_batch_size: int = 25,
        eval_batch_size: int = 100,
        batches_per_epoch: int = 1000,
        n_val_tasks: int = 100,
        n_test_tasks: int = 600,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        for key, value, smallest in (
            ("k_shot", k_shot, 1), ("k_query", k_query, 1), ("k_shot_train", k_shot_train, 1), ("k_query_train", k_query_train, 1),
            ("input_dim", input_dim, 1), ("output_dim", output_dim, 1),
        ):
            if value is not None:
                check_whole_number(key, value, smallest)
        low, high = check_range("x_range", x_range, key="data")
        if not (isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool) and noise_std >= 0 and math.isfinite(noise_std)):
            raise ConfigError(f"data.noise_std={noise_std!r} is not valid: give a number >= 0 (0: no noise).")
        super().__init__(
            meta_batch_size, eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed, num_workers, pin_memory, persistent_workers
        )
        self.family, self.family_options = family, plain_dict(family_options)
        self.x_range, self.input_dim, self.output_dim, self.noise_std = (low, high), input_dim, output_dim, float(noise_std)
        self.k_shot, self.k_query = k_shot, k_query
        self.k_shot_train = k_shot if k_shot_train is None else k_shot_train
        self.k_query_train = k_query if k_query_train is None else k_query_train
        self.kind: TaskKind = REGRESSION if loss == "mse" else REGRESSION.with_loss(regression_loss(loss))
        self._draw_family = import_callable(family, "data.family", _FAMILY_HINT)
        self._check_family()

    def draw_task(self, rng: np.random.Generator) -> RegressionTask:
        """One task of the family, as a RegressionTask."""
        task = self._draw_family(rng, **self.family_options)
        return task if isinstance(task, RegressionTask) else RegressionTask(task)

    def _check_family(self) -> None:
        """Draw one task and check what it returns: a function of [n, input_dim] inputs to [n, output_dim] finite targets."""
        where = f"data.family={self.family!r}"
        try:
            task = self.draw_task(np.random.default_rng(0))
        except TypeError as error:
            raise ConfigError(f"{where} cannot be called as family(rng, **data.family_options) ({error}): check data.family_options.") from None
        if not callable(task.function):
            raise ConfigError(f"{where} returned {type(task.function).__name__}, not a function of the inputs: give {_FAMILY_HINT}.")
        probe = FunctionTasks(lambda rng: task, "train", 0, 3, 2, self.x_range, self.input_dim, 0.0)
        x, y = probe.points(0, 0)
        if x.shape != (5, self.input_dim):
            raise ConfigError(f"{where} draws inputs of shape {list(x.shape)} for 5 points, not [5, data.input_dim={self.input_dim}]: fix its inputs or data.input_dim.")
        if y.shape != (5, self.output_dim):
            raise ConfigError(
                f"{where} maps inputs [5, {self.input_dim}] to targets of shape {list(y.shape)}, not [5, data.output_dim={self.output_dim}]: "
                "return one row per input, or set data.output_dim."
            )
        if not np.isfinite(y).all():
            raise ConfigError(f"{where} returned non-finite targets: check the function and data.x_range.")

    def setup(self, stage: str | None = None) -> None:
        """The three task streams: training tasks of `seed`, fixed val/test tasks of `eval_seed`."""
        if self._datasets:
            return
        common = dict(x_range=self.x_range, input_dim=self.input_dim, noise_std=self.noise_std)
        self._datasets = {
            "train": FunctionTasks(self.draw_task, "train", self.seed, self.k_shot_train, self.k_query_train, **common),
            "val": FunctionTasks(self.draw_task, "val", self.eval_seed, self.k_shot, self.k_query, **common),
            "test": FunctionTasks(self.draw_task, "test", self.eval_seed, self.k_shot, self.k_query, **common),
        }

    def tasks(self, part: str) -> FunctionTasks:
        """The task stream of `part` (train, val or test), for figures and for drawing tasks by hand."""
        self.setup()
        return self._datasets[part]  # type: ignore[return-value]
