"""Meta-World's meta-learning benchmarks (Yu et al. 2019) as RL tasks: ML1 (one skill, new goals) and ML10 / ML45 (new skills).

data.env=metaworld, its benchmark data.env_options.benchmark: ML1 (the skill data.env_options.task: reach, push,
pick-place, ...), ML10 (10 training skills, 5 held-out ones) or ML45 (45 and 5). A task is one number, the place of
its Meta-World Task in the benchmark's list: its `train_tasks` (the training classes, 50 goals each) then its
`test_tasks` (the test classes, 50 goals each; ML1's test classes are its one skill again, with 50 other goals). Each
Task names its class (env_name: reach-v3, ...) and holds its object's start position and goal (rand_vec); Catalogue
says which class and which goal every number is. Which numbers meta-train, validate and test is the data module's
business (metalight.tasks.meta_world).

The goal is hidden from the policy (Meta-World's partially observable ML setting): observations are Meta-World's 39
numbers with the goal zeroed, actions 4 numbers in [-1, 1], the reward Meta-World's shaped one. Meta-World reports
success (the object within a task-specific distance of the goal) in info["success"] at every step; an episode
succeeds if any of its steps does (Meta-World's evaluation stops an episode at its first success). The vector
environment reports the 0/1 of each step in info["success"] and keeps each copy's episode_success and episode_return
since its reset, which MetaWorldSuccess (tasks/meta_world.py) reads after every evaluation rollout.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalight.errors import ConfigError
from metalight.envs.vector import given_tasks, pooled, require

# the `rl` extra; metalight.envs lists the environments and turns a missing one into a ConfigError
import gymnasium
from gymnasium.vector import AutoresetMode, VectorEnv

N_GOALS = 50  # Meta-World's goals per class and split (metaworld._N_GOALS)
MAX_STEPS = 500  # Meta-World's max_path_length: the longest episode
# Yu et al.'s meta-learning benchmarks (metaworld 3 also has ML25, whose test classes overlap its training ones)
BENCHMARKS = ("ML1", "ML10", "ML45")


def known_tasks() -> list[str]:
    """The Meta-World skills ML1 can be built on (reach, push, pick-place, ...), without their -v3 suffix."""
    metaworld = require("metaworld", "metaworld")
    return sorted(name.removesuffix("-v3") for name in metaworld.ML1.ENV_NAMES)


def full_name(task: str) -> str:
    """Meta-World's name of a skill: reach -> reach-v3 (a full name is kept), or a ConfigError listing the known ones."""
    known = known_tasks()
    short = task.removesuffix("-v3") if isinstance(task, str) else task
    if short not in known:
        raise ConfigError(f"data.env_options.task={task!r} is not a Meta-World task: use one of {', '.join(known)}.")
    return f"{short}-v3"


def short_name(env_name: str) -> str:
    """A class's name without its version: reach-v3 -> reach (the name in logged metrics)."""
    return env_name.removesuffix("-v3")


def check_options(benchmark: str = "ML1", task: str | None = "reach", benchmark_seed: int = 0) -> None:
    """ConfigError unless metaworld is installed, benchmark is an ML benchmark, task an ML1 skill (null for the others)
    and benchmark_seed a whole number >= 0."""
    require("metaworld", "metaworld")
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"data.env_options.benchmark={benchmark!r} is not a Meta-World meta-learning benchmark: use one of {', '.join(BENCHMARKS)}.")
    if benchmark == "ML1":
        full_name(task)  # type: ignore[arg-type]
    elif task is not None:
        raise ConfigError(
            f"data.env_options.task={task!r} picks ML1's one skill, but {benchmark} has its own classes: set data.env_options.task=null "
            "(or data.env_options.benchmark=ML1)."
        )
    if isinstance(benchmark_seed, bool) or not isinstance(benchmark_seed, int) or benchmark_seed < 0:
        raise ConfigError(f"data.env_options.benchmark_seed={benchmark_seed!r} must be a whole number >= 0.")


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """A benchmark's tasks and classes: task number n is tasks[n], an arm of class classes[class_of[n]].

    train_classes / test_classes: the names of the classes of train_tasks / test_tasks, in Meta-World's order
    (ML1: the same one skill in both).
    """

    tasks: tuple[Any, ...]
    classes: dict[str, type]
    train_classes: tuple[str, ...]
    test_classes: tuple[str, ...]
    n_train: int

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every class once, training classes first: the order per-class figures are kept in."""
        return tuple(dict.fromkeys(self.train_classes + self.test_classes))

    def class_of(self, number: int) -> str:
        """The class (env_name) of task `number`."""
        return self.tasks[number].env_name

    def goals(self, env_name: str, side: str) -> list[int]:
        """The task numbers of class env_name among the training tasks (side="train") or the test tasks ("test"), in order."""
        span = range(self.n_train) if side == "train" else range(self.n_train, len(self.tasks))
        return [n for n in span if self.tasks[n].env_name == env_name]


def catalogue(benchmark: str = "ML1", task: str | None = "reach", benchmark_seed: int = 0) -> Catalogue:
    """The benchmark's tasks with goals drawn from benchmark_seed (checked first; built once per process)."""
    check_options(benchmark, task, benchmark_seed)
    return _built(benchmark, full_name(task) if benchmark == "ML1" else None, benchmark_seed)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def _built(benchmark: str, task: str | None, benchmark_seed: int) -> Catalogue:
    """Meta-World's benchmark object read into a Catalogue (ML1 about 2 s, ML10 about 4 s, ML45 about 20 s)."""
    metaworld = require("metaworld", "metaworld")
    built = metaworld.ML1(task, seed=benchmark_seed) if benchmark == "ML1" else getattr(metaworld, benchmark)(seed=benchmark_seed)
    return Catalogue(
        tasks=tuple(built.train_tasks) + tuple(built.test_tasks),
        classes={**built.train_classes, **built.test_classes},
        train_classes=tuple(built.train_classes),
        test_classes=tuple(built.test_classes),
        n_train=len(built.train_tasks),
    )


class MetaWorld(VectorEnv):
    """num_envs Meta-World arms stepped together, each an arm of its task's class set to its task (reset(options={"tasks": [num_envs, 1]})).

    Copies of different classes (ML10's reach and basketball) step side by side; the simulators are kept per class
    and reused (pooled), as building one costs about 0.1-0.2 s and 20 MB. Episodes last `horizon` steps
    (Meta-World's max_path_length, 500, bounds it); nothing terminates; reset puts each arm at its task's start
    with its object and goal (deterministic: Meta-World adds no noise, so reset's seed changes nothing). step
    returns (observations [num_envs, 39], rewards, terminated, truncated, info) with info["success"] the 0/1 of
    each copy at this step; episode_success and episode_return [num_envs] are whether a copy has succeeded and the
    sum of its rewards since its reset; copy_classes the class of each copy. Tensors in, tensors out (float32, on
    the tasks' device).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}
    observation_dim = 39
    action_dim = 4
    task_dim = 1
    check_options = staticmethod(check_options)

    def __init__(self, num_envs: int, horizon: int = MAX_STEPS, benchmark: str = "ML1", task: str | None = "reach", benchmark_seed: int = 0) -> None:
        if not 1 <= horizon <= MAX_STEPS:
            raise ConfigError(f"data.horizon={horizon} is longer than Meta-World's episodes ({MAX_STEPS} steps): use at most {MAX_STEPS}.")
        self.num_envs, self.horizon = num_envs, horizon
        self.catalogue = catalogue(benchmark, task, benchmark_seed)
        box = gymnasium.spaces.Box
        self.single_observation_space = box(-np.inf, np.inf, (39,), np.float32)
        self.single_action_space = box(-1.0, 1.0, (4,), np.float32)
        self.observation_space = box(-np.inf, np.inf, (num_envs, 39), np.float32)
        self.action_space = box(-1.0, 1.0, (num_envs, 4), np.float32)
        self._tasks: Tensor | None = None
        self.sims: list[Any] = []
        self.copy_classes: list[str] = []
        self.episode_success = np.zeros(num_envs, dtype=bool)
        self.episode_return = np.zeros(num_envs)

    @staticmethod
    def draw_task(rng: np.random.Generator, split: str | None = None, **options: Any) -> np.ndarray:
        """Refused: which goals and classes meta-train, validate and test is MetaWorldDataModule's choice, not a draw."""
        raise ConfigError(
            "data.env=metaworld needs data._target_=metalight.tasks.meta_world.MetaWorldDataModule, which splits the benchmark's tasks "
            "into meta-training, validation and test: use data=metaworld_ml1 or data=metaworld_ml10."
        )

    def goal(self, number: int) -> np.ndarray:
        """The goal position of task `number` (the last 3 numbers of its rand_vec)."""
        return np.asarray(pickle.loads(self.catalogue.tasks[number].data)["rand_vec"][-3:])

    def _assign(self, numbers: list[int]) -> None:
        """Give copy i an arm of task numbers[i]'s class (from that class's pool) set to that task."""
        names = [self.catalogue.class_of(n) for n in numbers]
        free = {name: iter(pooled(("metaworld", name), names.count(name), self.catalogue.classes[name])) for name in set(names)}
        self.sims, self.copy_classes = [next(free[name]) for name in names], names
        for sim, number in zip(self.sims, numbers):
            sim.set_task(self.catalogue.tasks[number])
            sim.max_path_length = self.horizon

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every arm at its start, set to the tasks options["tasks"] [num_envs, 1] (task numbers; kept when not given)."""
        tasks = given_tasks(options, self.num_envs)
        if tasks is not None:
            numbers = tasks[:, 0].round().long().tolist()
            if min(numbers) < 0 or max(numbers) >= len(self.catalogue.tasks):
                raise ValueError(f"task numbers must be in [0, {len(self.catalogue.tasks)}), got {min(numbers)}..{max(numbers)}")
            self._assign(numbers)
            self._tasks = tasks
        if self._tasks is None:
            raise ValueError("reset(options={'tasks': tasks}) first: each environment needs its task")
        observations = [sim.reset()[0] for sim in self.sims]
        self.episode_success[:] = False
        self.episode_return[:] = 0.0
        return self._tensor(np.stack(observations)), {}

    def _tensor(self, array: np.ndarray) -> Tensor:
        """array as float32 on the tasks' device."""
        return torch.as_tensor(np.asarray(array), dtype=torch.float32).to(self._tasks.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """One step of every arm (actions clipped to [-1, 1]): (observations, rewards, terminated, truncated, {"success": 0/1 [num_envs]})."""
        if self._tasks is None:
            raise ValueError("call reset() before step()")
        clipped = np.clip(torch.as_tensor(actions).detach().cpu().double().numpy(), -1.0, 1.0)
        observations, rewards, truncated = [], np.empty(self.num_envs), np.zeros(self.num_envs, dtype=bool)
        success = np.zeros(self.num_envs)
        for i, sim in enumerate(self.sims):
            observation, reward, _, truncated[i], info = sim.step(clipped[i])
            observations.append(observation)
            rewards[i], success[i] = reward, float(info["success"])
        self.episode_success |= success > 0
        self.episode_return += rewards
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self._tasks.device)
        return self._tensor(np.stack(observations)), self._tensor(rewards), terminated, torch.as_tensor(truncated).to(terminated.device), {"success": success}
