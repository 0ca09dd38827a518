"""Meta-World as task streams (data=metaworld_ml1, metaworld_ml10): which tasks meta-train, validate and test, and the success rates.

The environment and the benchmarks' task lists are metalight.envs.meta_world. Of every training class's 50 goals,
meta-training draws from all but the last data.n_val_tasks, validation (checkpoint choice) scores those held-out
goals, each once; the test scores the first data.n_test_tasks goals of every test class (ML1: its test goals; ML10:
its 5 held-out skills), each once, and, when data.n_train_class_tasks > 0, the first that many goals of every training
class (test/train_classes_*: how well the policy adapts to the skills it trained on, the goals meta-training drew
from, as Yu et al. report meta-training success). Evaluation lists interleave the classes (goal 0 of every class,
then goal 1, ...) so a batch holds every class alike and the simulators kept per class stay few. MetaWorldSuccess (a
callback, conf/data/metaworld_ml1.yaml) logs the success rates beside the learner's returns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from metalight.algorithms.base import mean_and_ci95
from metalight.envs.meta_world import MAX_STEPS, N_GOALS, catalogue, short_name
from metalight.errors import ConfigError
from metalight.tasks.datamodule import check_whole_number
from metalight.tasks.rl import EnvironmentTasks, RLDataModule
from metalight.tasks.samplers import EvalTaskSampler

log = logging.getLogger(__name__)


def interleave(lists: Sequence[Sequence[int]]) -> list[int]:
    """[[a0, a1], [b0, b1]] -> [a0, b0, a1, b1]: the i-th goal of every class, for i = 0, 1, ... (lists of equal length)."""
    return [numbers[i] for i in range(len(lists[0]) if lists else 0) for numbers in lists]


class ListedTasks(EnvironmentTasks):
    """Validation or test tasks: task i is task number numbers[i], each once, in order (the noise seeds as EnvironmentTasks draws them)."""

    def __init__(self, numbers: list[int], split: str, seed: int) -> None:
        super().__init__(None, split, seed)  # type: ignore[arg-type]  # parameters() lists, it never draws
        self.numbers = numbers

    def parameters(self, rng: np.random.Generator, index: int) -> np.ndarray:
        """Task number numbers[index]."""
        return np.array([float(self.numbers[index])])

    def __len__(self) -> int:
        return len(self.numbers)


class ClassBalancedTasks(EnvironmentTasks):
    """Meta-training tasks: task i of an epoch is of class i mod C (the C training classes in turn), its goal uniform over
    that class's meta-training goals, so a meta-batch of a multiple of C tasks holds each class equally often (as garage's
    MetaWorldTaskSampler deals ML10's meta-batch of 20: 2 tasks per class); ML1 has one class."""

    def __init__(self, goals: list[list[int]], seed: int) -> None:
        super().__init__(None, "train", seed)  # type: ignore[arg-type]  # parameters() draws per class
        self.goals = goals

    def parameters(self, rng: np.random.Generator, index: int) -> np.ndarray:
        """A goal of class index mod C, uniform over its meta-training goals."""
        goals = self.goals[index % len(self.goals)]
        return np.array([float(goals[rng.integers(len(goals))])])


class MetaWorldDataModule(RLDataModule):
    """data=metaworld_ml1 / metaworld_ml10: RLDataModule over a Meta-World benchmark's tasks (data.env_options.benchmark).

    Meta-trains on its training classes' goals but the last n_val_tasks of each (classes in turn), validates on those
    held-out goals, tests on the first n_test_tasks goals of each test class and, when n_train_class_tasks > 0, on the
    first that many goals of each training class (train_class_loader; MetaWorldSuccess scores them after the test).
    """

    def __init__(
        self, env: str = "metaworld", env_options: Mapping | None = None, horizon: int = MAX_STEPS, n_train_class_tasks: int = 0, **settings: Any
    ) -> None:
        if isinstance(horizon, int) and horizon > MAX_STEPS:
            raise ConfigError(f"data.horizon={horizon} is longer than Meta-World's episodes ({MAX_STEPS} steps): use at most {MAX_STEPS}.")
        super().__init__(env, env_options, horizon, **settings)
        check_whole_number("n_train_class_tasks", n_train_class_tasks, 0)
        if self.n_val_tasks >= N_GOALS:
            raise ConfigError(f"data.n_val_tasks={self.n_val_tasks} holds out that many of each training class's {N_GOALS} goals for validation: use fewer, e.g. 10.")
        if self.n_test_tasks > N_GOALS:
            raise ConfigError(f"data.n_test_tasks={self.n_test_tasks}: each test class has {N_GOALS} goals, each scored once: use at most {N_GOALS}.")
        if n_train_class_tasks > N_GOALS - self.n_val_tasks:
            raise ConfigError(
                f"data.n_train_class_tasks={n_train_class_tasks}: each training class has {N_GOALS - self.n_val_tasks} goals besides the "
                f"{self.n_val_tasks} held out for validation: use at most {N_GOALS - self.n_val_tasks}."
            )
        self.n_train_class_tasks = n_train_class_tasks

    def setup(self, stage: str | None = None) -> None:
        """The task streams: class-balanced draws for train (of `seed`); the held-out training goals (val), the test
        classes' goals (test) and the training classes' goals (train_classes), listed (their noise of `eval_seed`)."""
        if self._datasets:
            return
        tasks = catalogue(**self.env_options)
        train_goals = [tasks.goals(name, "train") for name in tasks.train_classes]
        kept = [goals[: len(goals) - self.n_val_tasks] for goals in train_goals]
        self._datasets = {
            "train": ClassBalancedTasks(kept, self.seed),
            "val": ListedTasks(interleave([goals[len(goals) - self.n_val_tasks :] for goals in train_goals]), "val", self.eval_seed),
            "test": ListedTasks(interleave([tasks.goals(name, "test")[: self.n_test_tasks] for name in tasks.test_classes]), "test", self.eval_seed),
            # scored as part of the test (with the test's noise seeds): the goals meta-training drew from
            "train_classes": ListedTasks(interleave([goals[: self.n_train_class_tasks] for goals in kept]), "test", self.eval_seed),
        }

    def _listed_loader(self, part: str) -> DataLoader:
        """This rank's part of the listed tasks of `part`, eval_batch_size at a time."""
        self.setup()
        return self._loader(part, EvalTaskSampler(len(self._datasets[part]), self.eval_batch_size, *self._rank_world()))

    def val_dataloader(self) -> DataLoader:
        """This rank's part of the held-out training goals (n_val_tasks per training class)."""
        return self._listed_loader("val")

    def test_dataloader(self) -> DataLoader:
        """This rank's part of the test classes' goals (n_test_tasks per test class)."""
        return self._listed_loader("test")

    def train_class_loader(self) -> DataLoader | None:
        """This rank's part of the training classes' goals scored at test (n_train_class_tasks per class), None when 0."""
        return self._listed_loader("train_classes") if self.n_train_class_tasks else None


class Tally:
    """Per class sums over evaluated tasks, for every evaluation step k (before adaptation, after step 1, ...): the task
    count, each task's success rate (its rollouts' mean) and return, and their squares (for the 95% intervals)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.sums: np.ndarray | None = None  # [C, 1 + 4 * steps]

    def add(self, names: Sequence[str], success: np.ndarray, returns: np.ndarray) -> None:
        """Add tasks of classes `names` with success rates and returns [tasks, steps]."""
        steps = success.shape[1]
        if self.sums is None:
            self.sums = np.zeros((len(self.classes), 1 + 4 * steps))
        for name, s, r in zip(names, success, returns):
            self.sums[self.classes.index(name)] += np.concatenate([[1.0], s, s**2, r, r**2])

    def metrics(self, trainer: Trainer, device: torch.device, stage: str, prefix: str, with_returns: bool) -> dict[str, float]:
        """The sums over ranks as {stage/prefix success_step{k}(_ci95), success; with_returns: return_step{k}(_ci95), return},
        and per class (when the tasks span several) stage/<class>/success_step{k} and return_step{k}."""
        if self.sums is None:
            return {}
        sums = trainer.strategy.reduce(torch.tensor(self.sums, device=device), reduce_op="sum").cpu().numpy()
        steps = (sums.shape[1] - 1) // 4
        parts = [("success", 1)] + ([("return", 1 + 2 * steps)] if with_returns else [])
        logged: dict[str, float] = {}
        total = sums.sum(0)
        for what, first in parts:
            for k in range(steps):
                mean, ci95 = mean_and_ci95(total[first + k], total[first + steps + k], int(total[0]))
                logged |= {f"{stage}/{prefix}{what}_step{k}": mean, f"{stage}/{prefix}{what}_step{k}_ci95": ci95}
            logged[f"{stage}/{prefix}{what}"] = logged[f"{stage}/{prefix}{what}_step{steps - 1}"]
        present = [(name, row) for name, row in zip(self.classes, sums) if row[0] > 0]
        if len(present) > 1:
            for name, row in present:
                for k in range(steps):
                    logged[f"{stage}/{short_name(name)}/success_step{k}"] = row[1 + k] / row[0]
                    logged[f"{stage}/{short_name(name)}/return_step{k}"] = row[1 + 2 * steps + k] / row[0]
        return logged


def task_results(made: Sequence[Any], n_tasks: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """From the vector environments of one evaluation batch (one per evaluation step, in order): each task's class, and its
    success rate and return averaged over its rollouts, [n_tasks, steps] (copies are task-major: task b holds copies b*R..)."""
    envs = [env for env in made if hasattr(env, "episode_success")]
    success = np.stack([env.episode_success.reshape(n_tasks, -1).mean(1) for env in envs], 1)
    returns = np.stack([env.episode_return.reshape(n_tasks, -1).mean(1) for env in envs], 1)
    rollouts = envs[0].num_envs // n_tasks
    return envs[0].copy_classes[::rollouts], success, returns


class MetaWorldSuccess(Callback):
    """Logs success rates beside the learner's returns: stage/success_step{k} (± _ci95) and stage/success (the last step),
    the fraction of a task's evaluation episodes that succeed, averaged over tasks; per class stage/<class>/success_step{k}
    and return_step{k} when the tasks span several classes. After the test it also scores the training classes
    (data.n_train_class_tasks goals each): test/train_classes_success_step{k} and test/train_classes_return_step{k}.

    During validation and test it hands the learner a TaskEnvironment whose make() keeps the vector environments it
    builds; after each batch it reads their episode_success and episode_return (one environment per evaluation step, in
    order: before adaptation, after step 1, ...). Classes hold equally many tasks, so the mean over tasks is Meta-World's
    mean over classes of each class's rate (metaworld.evaluation). Sums are added over ranks. The test's figures also
    join the learner's test_results (without test/), so eval.py's <checkpoint>.test.json holds them.
    """

    def __init__(self) -> None:
        self._made: list[Any] = []
        self._tally: Tally | None = None
        self._environment = None
        self._test_figures: dict[str, float] = {}

    def _start(self, pl_module: LightningModule) -> None:
        environment = getattr(pl_module, "environment", None)
        if environment is None:
            return
        self._environment, self._tally, self._made = environment, None, []

        def make(num_envs: int) -> Any:
            env = environment.make(num_envs)
            self._made.append(env)
            return env

        pl_module.environment = dataclasses.replace(environment, make=make)

    def _batch_end(self, batch: Any) -> None:
        """Add the batch's tasks to the tally (its classes from the environments it was scored in)."""
        if self._environment is None:
            return
        made, self._made = self._made, []
        if not any(hasattr(env, "episode_success") for env in made):
            return
        names, success, returns = task_results(made, batch["tasks"].shape[0])
        if self._tally is None:
            self._tally = Tally(next(env for env in made if hasattr(env, "catalogue")).catalogue.class_names)
        self._tally.add(names, success, returns)

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._environment is None:
            return
        logged = self._tally.metrics(trainer, pl_module.device, stage, "", with_returns=False) if self._tally is not None else {}
        if stage == "test":
            logged |= self._score_train_classes(trainer, pl_module)
            self._test_figures = {name.removeprefix("test/"): float(value) for name, value in logged.items()}
        pl_module.environment, self._environment, self._tally = self._environment, None, None
        if logged:
            pl_module.log_dict(logged, sync_dist=True)

    def _score_train_classes(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate the learner (its evaluate_tasks, as the test does) on the training classes' listed goals; their metrics."""
        loader = getattr(trainer.datamodule, "train_class_loader", lambda: None)()
        if loader is None:
            return {}
        log.info("Scoring the training classes too: %d tasks (data.n_train_class_tasks per class).", len(loader.dataset))
        self._tally, seen = None, 0
        for batch in loader:
            batch = {key: value.to(pl_module.device) for key, value in batch.items()}
            n_tasks = batch["tasks"].shape[0]
            pl_module.evaluate_tasks(batch, "test", [(seen + j) * trainer.world_size + trainer.global_rank for j in range(n_tasks)])
            seen += n_tasks
            self._batch_end(batch)
        return self._tally.metrics(trainer, pl_module.device, "test", "train_classes_", with_returns=True) if self._tally is not None else {}

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
        """Log test/success(_step{k}), score the training classes (test/train_classes_*); give the learner its environment back."""
        self._end(trainer, pl_module, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the figures to the learner's test_results (set at its epoch end, after this callback's), which eval.py saves."""
        if self._test_figures and isinstance(getattr(pl_module, "test_results", None), dict):
            pl_module.test_results.update(self._test_figures)
        self._test_figures = {}
