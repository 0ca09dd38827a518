"""Meta-World ML1 (Yu et al. 2019) as RL tasks (data=metaworld_ml1): one manipulation skill, its 50 training and 50 test goals.

A task is one number, the place of its goal in ML1's task list: 0-49 are ML1's `train_tasks`, 50-99 its
`test_tasks` (for data.env_options.task and benchmark_seed; each holds the object's start position and
the goal, Meta-World's `rand_vec`). The test scores ML1's test goals, each once, in order (data.n_test_tasks <= 50;
50: all of them), so the reported figures are on goals never trained on, as the benchmark's ML1 protocol asks.
Checkpoints are chosen on the last data.n_val_tasks training goals, held out of meta-training (which draws from the
others), never on test goals (MetaWorldML1DataModule). The goal is hidden from the policy (ML1's partially observable setting):
observations are Meta-World's 39 numbers with the goal zeroed, actions 4 numbers in [-1, 1].

Meta-World reports success (the object within a task-specific distance of the goal) in info["success"] at
every step; an episode succeeds if any of its steps does (Meta-World's evaluation stops an episode at its
first success). The vector environment reports the 0/1 of each step in info["success"] and keeps each
copy's episode_success; MetaWorldSuccess (a callback, conf/data/metaworld_ml1.yaml) logs val/success and
test/success (after the last inner step) and val/success_step{k} beside val/return.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalight.errors import ConfigError
from metalight.envs.vector import given_tasks, pooled, require

# the `rl` extra; metalight.envs lists the environments and turns a missing one into a ConfigError
import gymnasium
from gymnasium.vector import AutoresetMode, VectorEnv

N_GOALS = 50  # Meta-World's goals per split of an ML1 benchmark


def known_tasks() -> list[str]:
    """The Meta-World skills ML1 can be built on (reach, push, pick-place, ...), without their -v3 suffix."""
    metaworld = require("metaworld", "metaworld_ml1")
    return sorted(name.removesuffix("-v3") for name in metaworld.ML1.ENV_NAMES)


def full_name(task: str) -> str:
    """Meta-World's name of a skill: reach -> reach-v3 (a full name is kept), or a ConfigError listing the known ones."""
    known = known_tasks()
    short = task.removesuffix("-v3") if isinstance(task, str) else task
    if short not in known:
        raise ConfigError(f"data.env_options.task={task!r} is not a Meta-World task: use one of {', '.join(known)}.")
    return f"{short}-v3"


@functools.lru_cache(maxsize=8)
def benchmark(task: str, benchmark_seed: int) -> Any:
    """ML1 of `task` with its goals drawn from benchmark_seed (about 2 s; once per process)."""
    metaworld = require("metaworld", "metaworld_ml1")
    return metaworld.ML1(full_name(task), seed=benchmark_seed)


def task_list(task: str, benchmark_seed: int) -> list[Any]:
    """ML1's training tasks then its test tasks (Meta-World Task objects), the order task numbers index."""
    ml1 = benchmark(task, benchmark_seed)
    return list(ml1.train_tasks) + list(ml1.test_tasks)


class MetaWorldML1(VectorEnv):
    """num_envs Meta-World arms of one ML1 skill stepped together, each set to its task (reset(options={"tasks": [num_envs, 1]})).

    Episodes last `horizon` steps (Meta-World's max_path_length is 500 and bounds it); nothing terminates;
    reset puts each arm at the task's start with its object and goal (deterministic: Meta-World adds no
    noise, so reset's seed changes nothing). step returns (observations [num_envs, 39], rewards, terminated, truncated, info) with
    info["success"] the 0/1 of each copy at this step; episode_success [num_envs] is whether a copy has
    succeeded since its reset. Tensors in, tensors out (float32, on the tasks' device).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}
    observation_dim = 39
    action_dim = 4
    task_dim = 1

    def __init__(self, num_envs: int, horizon: int = 500, task: str = "reach", benchmark_seed: int = 0) -> None:
        self.check_options(task, benchmark_seed)
        if not 1 <= horizon <= 500:
            raise ConfigError(f"data.horizon={horizon} is longer than Meta-World's episodes (500 steps): use at most 500.")
        self.num_envs, self.horizon, self.task, self.benchmark_seed = num_envs, horizon, full_name(task), benchmark_seed
        self.tasks_list = task_list(task, benchmark_seed)
        cls = benchmark(task, benchmark_seed).train_classes[self.task]
        self.sims = pooled(("metaworld", self.task), num_envs, cls)
        box = gymnasium.spaces.Box
        self.single_observation_space = box(-np.inf, np.inf, (39,), np.float32)
        self.single_action_space = box(-1.0, 1.0, (4,), np.float32)
        self.observation_space = box(-np.inf, np.inf, (num_envs, 39), np.float32)
        self.action_space = box(-1.0, 1.0, (num_envs, 4), np.float32)
        self._tasks: Tensor | None = None
        self.episode_success = np.zeros(num_envs, dtype=bool)

    @staticmethod
    def check_options(task: str = "reach", benchmark_seed: int = 0) -> None:
        """ConfigError unless metaworld is installed, `task` is an ML1 skill and benchmark_seed a whole number >= 0."""
        full_name(task)
        if isinstance(benchmark_seed, bool) or not isinstance(benchmark_seed, int) or benchmark_seed < 0:
            raise ConfigError(f"data.env_options.benchmark_seed={benchmark_seed!r} must be a whole number >= 0.")

    @staticmethod
    def draw_task(rng: np.random.Generator, split: str | None = None, train_goals: int = N_GOALS, **options: Any) -> np.ndarray:
        """One training task number: uniform over ML1's first `train_goals` training goals (the others are held out for validation)."""
        if split != "train":  # drawn by the plain RLDataModule, which cannot tell the splits apart
            raise ConfigError(
                "data.env=metaworld_ml1 needs data._target_=metalight.tasks.meta_world.MetaWorldML1DataModule, which validates "
                "on held-out training goals and tests on ML1's test goals: use data=metaworld_ml1."
            )
        return np.array([float(rng.integers(train_goals))])

    def goal(self, number: int) -> np.ndarray:
        """The goal position of task `number` (the last 3 numbers of its rand_vec)."""
        import pickle

        return np.asarray(pickle.loads(self.tasks_list[number].data)["rand_vec"][-3:])

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every arm at its start, set to the tasks options["tasks"] [num_envs, 1] (task numbers; kept when not given)."""
        tasks = given_tasks(options, self.num_envs)
        if tasks is not None:
            numbers = tasks[:, 0].round().long().tolist()
            if min(numbers) < 0 or max(numbers) >= len(self.tasks_list):
                raise ValueError(f"task numbers must be in [0, {len(self.tasks_list)}), got {min(numbers)}..{max(numbers)}")
            for sim, number in zip(self.sims, numbers):
                sim.set_task(self.tasks_list[number])
                sim.max_path_length = self.horizon
            self._tasks = tasks
        if self._tasks is None:
            raise ValueError("reset(options={'tasks': tasks}) first: each environment needs its task")
        observations = [sim.reset()[0] for sim in self.sims]
        self.episode_success[:] = False
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
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self._tasks.device)
        return self._tensor(np.stack(observations)), self._tensor(rewards), terminated, torch.as_tensor(truncated).to(terminated.device), {"success": success}
