"""A point robot whose motors are mounted at an unknown angle with an unknown gain (data.env=point_robot): the cheapest body
that changes, for GrBAL in minutes on a CPU (experiment=quick_grbal).

A body is (theta, gain): the robot commands a velocity a in [-1, 1]^2, its motors push it along gain * R(theta) a,
clipped to [-0.1, 0.1]^2 per step, as 2-D navigation's point (Finn et al.'s point_env_randgoal.py, max step 0.1)
moves. theta ~ U[-max_angle, max_angle], gain ~ U[gain_range]; every episode starts at the origin and the reward is
minus the distance to a fixed goal (data.env_options.goal). A model trained across bodies without adapting predicts
the average body (a shorter push along the commanded direction) and plans curved, slow paths; one adapted to the
last steps knows this body's mount and drives straight. Tensors in, tensors out, all copies in one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalight.envs.vector import given_tasks
from metalight.errors import ConfigError

import gymnasium
from gymnasium.vector import AutoresetMode, VectorEnv

MAX_STEP = 0.1


class PointRobot(VectorEnv):
    """num_envs point robots, each with its own body (theta, gain): reset(options={"tasks": [num_envs, 2]}), step(actions [num_envs, 2])."""

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}
    observation_dim = 2
    action_dim = 2
    task_dim = 2

    def __init__(self, num_envs: int, horizon: int = 50, goal: Sequence[float] = (0.5, 0.5), max_angle: float = math.pi / 2, gain_range: Sequence[float] = (0.5, 1.5)) -> None:
        self.check_options(goal, max_angle, gain_range)
        self.num_envs, self.horizon = num_envs, horizon
        self.goal = torch.tensor([float(g) for g in goal])
        box = gymnasium.spaces.Box
        self.single_observation_space = box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = box(-np.inf, np.inf, (num_envs, 2), np.float32)
        self.action_space = box(-1.0, 1.0, (num_envs, 2), np.float32)
        self._mounts: Tensor | None = None
        self._position: Tensor | None = None
        self._t = 0

    @staticmethod
    def check_options(goal: Sequence[float] = (0.5, 0.5), max_angle: float = math.pi / 2, gain_range: Sequence[float] = (0.5, 1.5)) -> None:
        """One-line ConfigErrors for a goal that is not 2 numbers, a negative angle, an empty or non-positive gain range."""
        if not (isinstance(goal, Sequence) and len(goal) == 2 and all(isinstance(g, (int, float)) for g in goal)):
            raise ConfigError(f"data.env_options.goal={goal!r} must be 2 numbers, e.g. [0.5, 0.5].")
        if not isinstance(max_angle, (int, float)) or not 0 <= max_angle <= math.pi:
            raise ConfigError(f"data.env_options.max_angle={max_angle!r} must be a number in [0, pi] (radians the motors may be turned by).")
        ok = isinstance(gain_range, Sequence) and len(gain_range) == 2 and all(isinstance(g, (int, float)) for g in gain_range)
        if not ok or not 0 < gain_range[0] <= gain_range[1]:
            raise ConfigError(f"data.env_options.gain_range={gain_range!r} is empty or not positive: give [low, high] with 0 < low <= high, e.g. [0.5, 1.5].")

    @staticmethod
    def draw_task(rng: np.random.Generator, split: str = "train", max_angle: float = math.pi / 2, gain_range: Sequence[float] = (0.5, 1.5), **options: Any) -> np.ndarray:
        """One body: (theta ~ U[-max_angle, max_angle], gain ~ U[gain_range]); every split draws from the same family (its own seed)."""
        return np.array([rng.uniform(-max_angle, max_angle), rng.uniform(gain_range[0], gain_range[1])])

    def reward(self, observations: Tensor, actions: Tensor, next_observations: Tensor) -> Tensor:
        """Minus the distance to the goal after the step [...] (what the planner scores imagined steps with)."""
        return -torch.linalg.vector_norm(next_observations - self.goal.to(next_observations), dim=-1)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every robot at the origin, with the bodies options["tasks"] [num_envs, 2] (kept when not given)."""
        tasks = given_tasks(options, self.num_envs, self.task_dim)
        if tasks is not None:
            theta, gain = tasks[:, 0].float(), tasks[:, 1].float()
            cos, sin = torch.cos(theta), torch.sin(theta)
            self._mounts = gain[:, None, None] * torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        if self._mounts is None:
            raise ValueError("reset(options={'tasks': bodies}) first: each robot needs its body")
        self._position = torch.zeros(self.num_envs, 2, device=self._mounts.device)
        self._t = 0
        return self._position.clone(), {}

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """Move every robot by its clipped push: (positions, rewards, terminated (never), truncated (at the horizon), {})."""
        if self._position is None:
            raise ValueError("call reset() before step()")
        push = torch.einsum("nij,nj->ni", self._mounts, actions.to(self._mounts).clamp(-1.0, 1.0))
        following = self._position + push.clamp(-MAX_STEP, MAX_STEP)
        reward = self.reward(self._position, actions, following)
        self._position = following
        self._t += 1
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=following.device)
        return following.clone(), reward, terminated, torch.full_like(terminated, self._t >= self.horizon), {}
