"""2-D navigation (Finn et al. 2017, §5.3): a point moves toward a goal, the authors' point_env_randgoal.py in torch, behind gymnasium's vector API.

Every copy of the environment is a row of one tensor, so all tasks x all rollouts take one step together
(one clamp, one add, one norm), whatever their number: sampling costs almost nothing beside the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalight.errors import ConfigError

# the `rl` extra (pip install -e '.[rl]'): this module is imported only when data.env names it, and tasks/rl.py turns
# a missing gymnasium into one line naming the extra
import gymnasium
from gymnasium.vector import AutoresetMode, VectorEnv


class Navigation2DEnv(VectorEnv):
    """num_envs points in the plane, each with its own goal: cbfinn/maml_rl's PointEnvRandGoal, vectorized.

    Each episode starts at the origin; an action (a velocity) is clipped to [-max_action, max_action]^2 and
    added to the position, the reward is minus the Euclidean distance to the goal, and an episode ends
    (terminated) once both coordinates are within 0.01 of the goal, as the authors' and pytorch-maml-rl's
    environments do, or (truncated) after `horizon` steps. With normalized_actions (the authors' rllab
    normalize() wrapper) the policy acts in [-1, 1]^2: its action is multiplied by max_action before the
    clip; without, it is clipped as it is (pytorch-maml-rl). goal_range is the task distribution (draw_task). Goals are set at reset, one row per copy:
    `reset(options={"tasks": goals})`. Observations are the positions. Tensors in, tensors out
    (on the goals' device); nothing resets by itself (autoreset disabled): the sampler masks finished episodes.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}
    observation_dim = 2
    action_dim = 2
    task_dim = 2
    success_distance = 0.01

    def __init__(
        self, num_envs: int, horizon: int = 100, goal_range: Sequence[float] = (-0.5, 0.5), normalized_actions: bool = True, max_action: float = 0.1
    ) -> None:
        self.num_envs, self.horizon, self.max_action = num_envs, horizon, max_action
        self.goal_range, self.normalized_actions = tuple(goal_range), normalized_actions
        # rllab's normalize(), which the authors wrap the environment in: the policy acts in [-1, 1], scaled to the action box
        self.action_scale = max_action if normalized_actions else 1.0
        box, bound = gymnasium.spaces.Box, max_action / self.action_scale  # the box the policy acts in
        self.single_observation_space = box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = box(-bound, bound, (2,), np.float32)
        self.observation_space = box(-np.inf, np.inf, (num_envs, 2), np.float32)
        self.action_space = box(-bound, bound, (num_envs, 2), np.float32)
        self._goals: Tensor | None = None
        self._position: Tensor | None = None
        self._t = 0

    @staticmethod
    def draw_task(rng: np.random.Generator, goal_range: Sequence[float] = (-0.5, 0.5), **physics: Any) -> np.ndarray:
        """One task: a goal drawn uniformly in goal_range^2 (Finn et al.: [-0.5, 0.5]^2)."""
        return rng.uniform(goal_range[0], goal_range[1], size=2)

    @staticmethod
    def check_options(goal_range: Sequence[float] = (-0.5, 0.5), normalized_actions: bool = True) -> None:
        """ConfigError unless goal_range is [low, high] with low < high and normalized_actions a bool."""
        ok = isinstance(goal_range, Sequence) and len(goal_range) == 2 and all(isinstance(v, (int, float)) for v in goal_range)
        if not ok or not goal_range[0] < goal_range[1]:
            shown = list(goal_range) if isinstance(goal_range, Sequence) else goal_range
            raise ConfigError(f"data.env_options.goal_range={shown!r} must be [low, high] with low < high, e.g. [-0.5, 0.5].")
        if not isinstance(normalized_actions, bool):
            raise ConfigError(f"data.env_options.normalized_actions={normalized_actions!r} must be true or false.")

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every point back at the origin, with the goals options["tasks"] [num_envs, 2] (kept when not given)."""
        goals = (options or {}).get("tasks")
        if goals is not None:
            if goals.shape != (self.num_envs, 2):
                raise ValueError(f"goals of shape {list(goals.shape)} for {self.num_envs} environments: give [{self.num_envs}, 2]")
            self._goals = goals
        if self._goals is None:
            raise ValueError("reset(options={'tasks': goals}) first: each environment needs its goal")
        self._position = torch.zeros_like(self._goals)
        self._t = 0
        return self._position.clone(), {}

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """Move by the clipped actions [num_envs, 2]: (positions, rewards, terminated, truncated, {})."""
        if self._position is None:
            raise ValueError("call reset() before step()")
        self._position = self._position + (self.action_scale * actions).clamp(-self.max_action, self.max_action)
        offset = self._position - self._goals
        reward = -torch.linalg.vector_norm(offset, dim=-1)
        terminated = (offset.abs() < self.success_distance).all(dim=-1)
        self._t += 1
        truncated = torch.full_like(terminated, self._t >= self.horizon)
        return self._position.clone(), reward, terminated, truncated, {}
