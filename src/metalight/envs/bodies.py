"""HalfCheetah bodies that change from task to task: a crippled joint (data.env=halfcheetah_cripple; Nagabandi et al. 2019,
GrBAL) or randomized physical parameters (data.env=halfcheetah_rand_params; rand_param_envs' RandomEnv).

Both run forward, as learning_to_adapt's envs/half_cheetah_env.py rewards it: r = v - 0.5 * 0.1 * sum(a^2), v the
forward velocity of the cheetah's centre of mass after the step and a the action MuJoCo applies (clipped to [-1, 1],
the crippled joint's entry zeroed). Everything else is HalfCheetahTasks' (metalight.envs.halfcheetah): observations
are the 20 numbers of convention=rllab (qpos[1:], qvel, the centre of mass), the copies stepped in one
mujoco.rollout call, start noise from each copy's seed. GrBAL's physics is frame_skip 1 (one MuJoCo step of 0.01 s
per action) and 1,000-step episodes: conf/data/halfcheetah_cripple.yaml sets them.

A planner needs the reward as a function of a predicted transition: reward(observations, actions,
next_observations) is learning_to_adapt's HalfCheetahEnv.reward, the one its MPC controller scores candidate
actions with (the centre of mass's displacement over dt, the control cost on the clipped action, no mask: the
planner does not know the body).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalight.envs.halfcheetah import CONTROL_COST, HalfCheetahTasks
from metalight.envs.vector import pooled
from metalight.errors import ConfigError

JOINTS = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")  # action index -> actuated joint (and its geom)
# learning_to_adapt's reset_task draws np.random.randint(1, action_dim) while training: bthigh is never crippled then
TRAIN_JOINTS, TEST_JOINTS = (1, 2, 3, 4, 5), (0,)
RED = (1.0, 0.0, 0.0)  # the crippled limb's colour in learning_to_adapt's reset_task

# rand_param_envs' RandomEnv.sample_tasks: each element of each array times base ** U(-log_scale_limit, log_scale_limit),
# drawn in this order; the shapes are HalfCheetah-v5's (8 bodies with the world, 9 dofs, 9 geoms with the floor)
PARAMETERS = {
    "body_mass": ((8,), 1.5),
    "body_inertia": ((8, 3), 1.5),
    "dof_damping": ((9,), 1.3),
    "geom_friction": ((9, 3), 1.5),
}
RAND_PARAMS = tuple(PARAMETERS)
LOG_SCALE_LIMIT = 3.0  # rand_param_envs' HopperRandParamsEnv / Walker2DRandParamsEnv default


class HalfCheetahBody(HalfCheetahTasks):
    """A HalfCheetah whose body is the task: run forward (r = centre-of-mass velocity - control cost) whatever the body."""

    family = "forward"

    def task_reward(self, velocity: np.ndarray) -> np.ndarray:
        """The forward velocity itself."""
        return velocity

    def reward(self, observations: Tensor, actions: Tensor, next_observations: Tensor) -> Tensor:
        """The reward of transitions [..., 20], [..., 6] -> [..., 20] as learning_to_adapt's planner scores them [...]:
        (x of the centre of mass after - before) / dt - 0.05 * sum(clip(a, -1, 1)^2)."""
        progress = (next_observations[..., -3] - observations[..., -3]) / self.dt
        return progress - CONTROL_COST * actions.clamp(-1.0, 1.0).pow(2).sum(-1)


def joint_list(key: str, joints: Any) -> tuple[int, ...]:
    """data.env_options.`key` as joint numbers, or a one-line ConfigError naming the cheetah's joints."""
    names = ", ".join(f"{i} {name}" for i, name in enumerate(JOINTS))
    ok = isinstance(joints, (list, tuple)) and len(joints) > 0
    ok = ok and all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(JOINTS) for j in joints)
    if not ok:
        raise ConfigError(f"data.env_options.{key}={joints!r} must be a non-empty list of the cheetah's joints: numbers in 0-5 ({names}).")
    return tuple(joints)


class HalfCheetahCripple(HalfCheetahBody):
    """data.env=halfcheetah_cripple: each task disables one joint's motor (learning_to_adapt's HalfCheetahEnv, task='cripple').

    A task is one number, the crippled joint (action index 0-5: bthigh, bshin, bfoot, fthigh, fshin, ffoot); its
    action entry is multiplied by 0 before MuJoCo applies it and before the control cost, as the authors' step
    multiplies the action by cripple_mask. Training and validation tasks are drawn uniformly from train_joints
    (1-5, the authors' randint(1, 6)), test tasks from test_joints (0: bthigh, never crippled in training), so the
    test scores a body never trained on and checkpoints are never chosen on it.

    Differences from learning_to_adapt: its run_grbal.py as released sets 'task': None, an intact body that never
    changes (the crippled experiment needs task='cripple'); it redraws the joint from the global np.random at every
    reset (reset_every_episode), here each task's joint comes from its own generator (seed, split, epoch, index), test
    tasks from eval_seed. Rendering colours the crippled limb red (geom_rgba), as its reset_task does.
    """

    env_name = "halfcheetah_cripple"

    @staticmethod
    def draw_task(rng: np.random.Generator, split: str = "train", train_joints: Any = TRAIN_JOINTS, test_joints: Any = TEST_JOINTS, **options: Any) -> np.ndarray:
        """One crippled joint, uniform over test_joints for split "test", over train_joints for "train" and "val"."""
        joints = test_joints if split == "test" else train_joints
        return np.array([float(joints[rng.integers(len(joints))])])

    @classmethod
    def check_task_options(cls, train_joints: Any = TRAIN_JOINTS, test_joints: Any = TEST_JOINTS) -> None:
        """ConfigError unless both are non-empty lists of joint numbers in 0-5."""
        joint_list("train_joints", train_joints)
        joint_list("test_joints", test_joints)

    def set_tasks(self, tasks: np.ndarray) -> None:
        """Each copy's mask: 1 for every joint but its crippled one."""
        joints = np.rint(tasks[:, 0]).astype(int)
        if joints.min() < 0 or joints.max() >= self.action_dim:
            raise ValueError(f"crippled joints must be in [0, {self.action_dim}), got {joints.min()}..{joints.max()}")
        self.mask = np.ones((self.num_envs, self.action_dim))
        self.mask[np.arange(self.num_envs), joints] = 0.0
        self._goals = joints

    def applied_actions(self, clipped: np.ndarray) -> np.ndarray:
        """The clipped actions with each copy's crippled joint zeroed."""
        return clipped * self.mask

    @staticmethod
    def geom_colours(model: Any, rgba: np.ndarray, joint: int) -> np.ndarray:
        """The geom colours [ngeom, 4] that show joint `joint` crippled: rgba (the intact body's) with that joint's limb red."""
        import mujoco

        colours = np.array(rgba, copy=True)
        colours[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, JOINTS[joint]), :3] = RED
        return colours


class HalfCheetahRandParams(HalfCheetahBody):
    """data.env=halfcheetah_rand_params: each task scales the body's masses, inertias, joint damping and geom friction
    element by element (rand_param_envs' RandomEnv.sample_tasks on HalfCheetah).

    A task is 68 multipliers, those of body_mass (8), body_inertia (8 x 3), dof_damping (9) and geom_friction (9 x 3)
    in that order: base ** U(-log_scale_limit, log_scale_limit) for each element of the arrays named in rand_params
    (base 1.5, damping 1.3), 1 for the others. Each copy steps its own MjModel (the intact model's arrays times its
    task's multipliers, set at reset), all of them in one mujoco.rollout call; the models are built once per process
    and reused. Train, validation and test bodies come from the same distribution; the test's are fixed by eval_seed.

    Differences from rand_param_envs: it has no HalfCheetah (Hopper and Walker2d only, with RandomEnv's frame_skip 4
    and their own rewards): the body, reward and observations here are GrBAL's HalfCheetah's. As the reference, the
    model's derived constants (mj_setConst: invweight0, ...) stay the intact body's.
    """

    env_name = "halfcheetah_rand_params"
    task_dim = sum(int(np.prod(shape)) for shape, _ in PARAMETERS.values())

    def __init__(self, num_envs: int, horizon: int = 200, **options: Any) -> None:
        super().__init__(num_envs, horizon=horizon, **options)
        for name, (shape, _) in PARAMETERS.items():
            if getattr(self.model, name).shape != shape:  # a HalfCheetah model of another gymnasium release
                raise RuntimeError(f"HalfCheetah's {name} has shape {getattr(self.model, name).shape}, not {shape}: update bodies.PARAMETERS")
        self.intact = {name: getattr(self.model, name).copy() for name in PARAMETERS}
        # self.model (the simulators') is never changed: each copy's body lives in a model of its own
        self.copy_models = pooled(("halfcheetah_rand_params",), num_envs, lambda: copy.copy(self.model))

    @staticmethod
    def draw_task(rng: np.random.Generator, log_scale_limit: float = LOG_SCALE_LIMIT, rand_params: Any = RAND_PARAMS, **options: Any) -> np.ndarray:
        """One body: the 68 multipliers, base ** U(-log_scale_limit, log_scale_limit) per element of each randomized array, 1 elsewhere."""
        parts = []
        for name, (shape, base) in PARAMETERS.items():
            parts.append(base ** rng.uniform(-log_scale_limit, log_scale_limit, size=shape) if name in rand_params else np.ones(shape))
        return np.concatenate([part.ravel() for part in parts])

    @classmethod
    def check_task_options(cls, log_scale_limit: float = LOG_SCALE_LIMIT, rand_params: Any = RAND_PARAMS) -> None:
        """ConfigError unless log_scale_limit is a number > 0 and rand_params a non-empty subset of the four arrays."""
        if isinstance(log_scale_limit, bool) or not isinstance(log_scale_limit, (int, float)) or not log_scale_limit > 0:
            raise ConfigError(f"data.env_options.log_scale_limit={log_scale_limit!r} gives an empty or negative scale range: use a number > 0 (rand_param_envs: 3.0).")
        ok = isinstance(rand_params, (list, tuple)) and len(rand_params) > 0 and all(name in PARAMETERS for name in rand_params)
        if not ok:
            raise ConfigError(f"data.env_options.rand_params={rand_params!r} must be a non-empty list of {', '.join(RAND_PARAMS)}.")

    def set_tasks(self, tasks: np.ndarray) -> None:
        """Each copy's model: the intact body's arrays times its task's multipliers."""
        for model, multipliers in zip(self.copy_models, tasks):
            start = 0
            for name, (shape, _) in PARAMETERS.items():
                size = int(np.prod(shape))
                getattr(model, name)[:] = self.intact[name] * multipliers[start : start + size].reshape(shape)
                start += size
