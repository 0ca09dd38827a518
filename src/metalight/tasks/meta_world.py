"""Meta-World ML1 as a task stream (data=metaworld_ml1): which goals meta-train, validate and test, and the success rate.

The environment itself (MetaWorldML1, the goal lists) is metalight.envs.meta_world. Meta-training draws from ML1's
training goals but the last data.n_val_tasks, validation scores those held-out training goals (checkpoint choice), the
test scores ML1's test goals, each once, in order. MetaWorldSuccess (a callback, conf/data/metaworld_ml1.yaml) logs
val/success and test/success beside val/return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from metalight.envs.meta_world import N_GOALS
from metalight.errors import ConfigError
from metalight.tasks.rl import EnvironmentTasks, RLDataModule


class ListedGoals(EnvironmentTasks):
    """Validation or test tasks of ML1: task i is goal number first + i, each goal once, in order (the noise seeds as EnvironmentTasks draws them)."""

    def __init__(self, first: int, split: str, seed: int) -> None:
        super().__init__(lambda rng: np.zeros(1), split, seed)
        self.first = first

    def parameters(self, rng: np.random.Generator, index: int) -> np.ndarray:
        """Goal number first + index."""
        return np.array([float(self.first + index)])


class MetaWorldML1DataModule(RLDataModule):
    """data=metaworld_ml1: RLDataModule that meta-trains on ML1's training goals but the last n_val_tasks, validates on those
    (each once) and tests on its test goals (the first n_test_tasks, each once)."""

    def __init__(self, env: str = "metaworld_ml1", env_options: Mapping | None = None, horizon: int = 500, **settings: Any) -> None:
        if isinstance(horizon, int) and horizon > 500:
            raise ConfigError(f"data.horizon={horizon} is longer than Meta-World's episodes (500 steps): use at most 500.")
        super().__init__(env, env_options, horizon, **settings)
        if self.n_val_tasks >= N_GOALS:
            raise ConfigError(f"data.n_val_tasks={self.n_val_tasks} holds out that many of ML1's {N_GOALS} training goals for validation: use fewer, e.g. 10.")
        if self.n_test_tasks > N_GOALS:
            raise ConfigError(f"data.n_test_tasks={self.n_test_tasks}: ML1 has {N_GOALS} test goals, each scored once: use at most {N_GOALS}.")

    def setup(self, stage: str | None = None) -> None:
        """The three task streams: training goals 0..49-n_val drawn for train (of `seed`), the held-out training goals
        for val and ML1's test goals for test, listed (their noise of `eval_seed`)."""
        if not self._datasets:
            train_goals = N_GOALS - self.n_val_tasks
            draw = lambda rng: self.env_class.draw_task(rng, split="train", train_goals=train_goals, **self.env_options)  # noqa: E731
            self._datasets = {
                "train": EnvironmentTasks(draw, "train", self.seed),
                "val": ListedGoals(train_goals, "val", self.eval_seed),
                "test": ListedGoals(N_GOALS, "test", self.eval_seed),
            }


class MetaWorldSuccess(Callback):
    """Logs val/success and test/success: the fraction of evaluation episodes that reach their goal, after each inner step (stage/success_step{k}).

    During validation and test it hands the learner a TaskEnvironment whose make() keeps the vector
    environments it builds; after each batch it reads their episode_success (one environment per
    evaluation step, in order: before adaptation, after step 1, ...), averaged over each task's rollouts and
    then over tasks, summed over ranks.
    """

    def __init__(self) -> None:
        self._made: list[Any] = []
        self._sums: np.ndarray | None = None
        self._environment = None

    def _start(self, pl_module: LightningModule) -> None:
        environment = getattr(pl_module, "environment", None)
        if environment is None:
            return
        self._environment, self._sums = environment, None

        def make(num_envs: int) -> Any:
            env = environment.make(num_envs)
            self._made.append(env)
            return env

        pl_module.environment = dataclasses.replace(environment, make=make)

    def _batch_end(self, batch: Any) -> None:
        if self._environment is None:
            return
        n_tasks = batch["tasks"].shape[0]
        rates = [env.episode_success.reshape(n_tasks, -1).mean(1).sum() for env in self._made if hasattr(env, "episode_success")]
        self._made = []
        if rates:
            counts = np.array([n_tasks, *rates], dtype=np.float64)
            self._sums = counts if self._sums is None or len(self._sums) != len(counts) else self._sums + counts

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._environment is None:
            return
        pl_module.environment, self._environment = self._environment, None
        if self._sums is None:
            return
        sums = trainer.strategy.reduce(torch.tensor(self._sums, device=pl_module.device), reduce_op="sum").tolist()
        rates = [s / sums[0] for s in sums[1:]]
        self._sums = None
        pl_module.log_dict({f"{stage}/success_step{k}": r for k, r in enumerate(rates)}, sync_dist=True)
        pl_module.log(f"{stage}/success", rates[-1], sync_dist=True)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the vector environments validation builds."""
        self._start(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Add the batch's success rates."""
        self._batch_end(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log val/success and val/success_step{k}; give the learner its environment back."""
        self._end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the vector environments the test builds."""
        self._start(pl_module)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Add the batch's success rates."""
        self._batch_end(batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log test/success and test/success_step{k}; give the learner its environment back."""
        self._end(trainer, pl_module, "test")
