"""Meta-reinforcement learning tasks (data=navigation2d): a task is an environment's parameters (a goal), the learner samples its own rollouts.

A meta-batch is {"tasks": [B, task_dim] float32, "seeds": [B] int64}: each task's parameters, drawn from
numpy's generator seeded with (seed, split, epoch, index) as every other kind of task, and a seed from the
same generator that fixes the exploration noise of every rollout of that task. So training tasks are a
function of (seed, step, rank) only, validation and test are the fixed tasks of eval_seed, a task's rollouts
do not depend on which other tasks share its batch or process, and every learner (MAML-RL, the pretrained
and the random baselines) is scored on the same goals with the same noise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from metalight.envs import KNOWN_ENVIRONMENTS, environment_class
from metalight.errors import ConfigError
from metalight.tasks.datamodule import TaskDataModule, check_whole_number, plain_dict
from metalight.tasks.kinds import REINFORCEMENT, TaskKind
from metalight.tasks.samplers import Key

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def checked_environment(env: str, env_options: Mapping | None) -> tuple[type, dict[str, Any]]:
    """The class data.env names and data.env_options as a plain dict, both checked; one-line ConfigErrors otherwise."""
    if env not in KNOWN_ENVIRONMENTS:
        raise ConfigError(f"data.env={env!r} is not known: use one of {', '.join(KNOWN_ENVIRONMENTS)}.")
    try:
        env_class = environment_class(env)
    except ImportError as error:
        raise ConfigError(f"data.env={env} needs the `rl` extra ({error.name} is not installed): pip install -e '.[rl]' (make install installs it).") from None
    options = plain_dict(env_options)
    try:
        env_class.check_options(**options)
    except TypeError as error:
        raise ConfigError(f"data.env_options={options} are not options of data.env={env} ({error}): check their names.") from None
    return env_class, options


@dataclasses.dataclass(frozen=True)
class TaskEnvironment:
    """What a learner needs to act in a family of RL tasks: the vector environment and the episode settings.

    make(num_envs) builds a gymnasium VectorEnv of num_envs copies (reset with options={"tasks": [num_envs,
    task_dim]}); each task runs `rollouts` episodes of at most `horizon` steps per adaptation step while
    training, `eval_rollouts` at validation and test.
    """

    name: str
    make: Callable[[int], Any]
    observation_dim: int
    action_dim: int
    horizon: int
    rollouts: int
    eval_rollouts: int


@dataclasses.dataclass(frozen=True)
class ReinforcementKind(TaskKind):
    """REINFORCEMENT (loss: the policy-gradient surrogate, metric: the return) with the environment its tasks run in."""

    environment: TaskEnvironment | None = None


class EnvironmentTasks(Dataset):
    """A split as RL tasks: dataset[[(epoch, index), ...]] is {"tasks": [B, task_dim], "seeds": [B]} of those tasks."""

    def __init__(self, draw: Callable[[np.random.Generator], np.ndarray], split: str, seed: int) -> None:
        self.draw, self.split, self.seed = draw, split, seed

    def task(self, epoch: int, index: int) -> tuple[np.ndarray, int]:
        """Task (epoch, index): its parameters and the seed of its rollouts' noise."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], epoch, index])
        return np.asarray(self.parameters(rng, index), dtype=np.float64), int(rng.integers(2**62))

    def parameters(self, rng: np.random.Generator, index: int) -> np.ndarray:
        """The parameters of task `index`: drawn from rng (a subclass may list them instead)."""
        return self.draw(rng)

    def __getitem__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        tasks, seeds = zip(*(self.task(epoch, index) for epoch, index in keys))
        return {"tasks": torch.from_numpy(np.stack(tasks)).float(), "seeds": torch.tensor(seeds, dtype=torch.int64)}


class RLDataModule(TaskDataModule):
    """Meta-batches of RL tasks of environment `env` (data=navigation2d): task parameters and noise seeds; the learner rolls out.

    env names the environment (navigation2d), env_options its task distribution (goal_range). horizon:
    the most steps of an episode; rollouts: episodes per task for each adaptation step (and for the
    meta-objective) while training, eval_rollouts (null: rollouts) at validation and test.
    """

    kind: TaskKind = REINFORCEMENT  # the instance's own carries the environment (ReinforcementKind)

    def __init__(
        self,
        env: str = "navigation2d",
        env_options: Mapping | None = None,
        horizon: int = 100,
        rollouts: int = 20,
        eval_rollouts: int | None = None,
        meta_batch_size: int = 20,
        eval_batch_size: int = 40,
        batches_per_epoch: int = 50,
        n_val_tasks: int = 40,
        n_test_tasks: int = 40,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        for key, value, smallest in (
            ("horizon", horizon, 1), ("rollouts", rollouts, 1), ("eval_rollouts", eval_rollouts, 1),
        ):
            if value is not None:
                check_whole_number(key, value, smallest)
        env_class, options = checked_environment(env, env_options)
        super().__init__(
            meta_batch_size, eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed, num_workers, pin_memory, persistent_workers
        )
        self.env, self.env_options, self.env_class = env, options, env_class
        self.horizon, self.rollouts = horizon, rollouts
        self.eval_rollouts = rollouts if eval_rollouts is None else eval_rollouts
        self.environment = TaskEnvironment(
            env, self.make_env, self.env_class.observation_dim, self.env_class.action_dim, horizon, rollouts, self.eval_rollouts
        )
        self.kind = ReinforcementKind(**{f.name: getattr(REINFORCEMENT, f.name) for f in dataclasses.fields(TaskKind)}, environment=self.environment)

    def make_env(self, num_envs: int) -> Any:
        """A vector environment of num_envs copies (gymnasium's VectorEnv API), episodes of at most `horizon` steps."""
        return self.env_class(num_envs, horizon=self.horizon, **self.env_options)

    def draw_task(self, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        """One task's parameters (a goal for navigation2d) for `split`: an environment may keep some tasks for the test (halfcheetah_cripple's joints)."""
        return self.env_class.draw_task(rng, split=split, **self.env_options)

    def setup(self, stage: str | None = None) -> None:
        """The three task streams: training tasks of `seed`, fixed val/test tasks of `eval_seed`; the first task of each
        is drawn at once, so an environment that refuses a split (Meta-World without its data module) stops before training."""
        if not self._datasets:
            self._datasets = {
                "train": EnvironmentTasks(functools.partial(self.draw_task, split="train"), "train", self.seed),
                "val": EnvironmentTasks(functools.partial(self.draw_task, split="val"), "val", self.eval_seed),
                "test": EnvironmentTasks(functools.partial(self.draw_task, split="test"), "test", self.eval_seed),
            }
            for stream in self._datasets.values():
                stream.task(0, 0)

    def tasks(self, part: str) -> EnvironmentTasks:
        """The task stream of `part` (train, val or test)."""
        self.setup()
        return self._datasets[part]  # type: ignore[return-value]
