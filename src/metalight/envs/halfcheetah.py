"""HalfCheetah direction and velocity tasks (Finn et al. 2017, §5.3): gymnasium's MuJoCo HalfCheetah-v5 with the authors' task rewards, behind gymnasium's vector API.

A task is one number: the direction (+1 forward, -1 backward) for data=halfcheetah_dir, the target velocity
for data=halfcheetah_vel. The rewards are those of cbfinn/maml_rl (rllab/envs/mujoco/half_cheetah_env_rand_direc.py
and half_cheetah_env_rand.py):

    direction: r = direction * v - 0.5 * 0.1 * sum(clip(a, -1, 1)^2)
    velocity:  r = -|v - goal_velocity| - 0.5 * 0.1 * sum(clip(a, -1, 1)^2)

The control cost is on the clipped action, as the authors' (the actuators' ctrlrange is [-1, 1]: MuJoCo applies
the clipped action). pytorch-maml-rl (maml_rl/envs/mujoco/half_cheetah.py, its halfcheetah-*.yaml configs) differs:
its policy's action is divided by `normalization_scale: 10` before the clip and the control cost is taken on that
scaled action, on 100-step episodes; metalight does not scale actions (declared in RESULTS.md).

Two conventions (`convention`, both on HalfCheetah-v5's model, the same bodies and timestep 0.01 as rllab's
half_cheetah.xml), one per reference:
- rllab (Finn et al.'s code): start state qpos0 + N(0, 0.01) and qvel N(0, 0.1) (rllab's MujocoEnv.reset_mujoco);
  v is the velocity of the cheetah's centre of mass (rllab's get_body_comvel("torso"): the torso's subtree, i.e. all
  of it) and the observation's last 3 numbers its position, both of the state after the step (rllab calls forward()
  after stepping).
- gymnasium (HalfCheetah-v5, pytorch-maml-rl's gym HalfCheetah): start noise uniform +-reset_noise_scale on qpos,
  N(0, reset_noise_scale) on qvel; v = (root x after - root x before) / dt, dt the time of one action (frame_skip x
  0.01 s); the last 3 numbers the torso body's position as gymnasium reports it after a step (MuJoCo's kinematics of
  the last substep's start).
Observations are the references' 20 numbers: qpos[1:] (8), qvel (9) and the torso's 3 numbers above.
`frame_skip` is the MuJoCo steps per action: rllab's model has none (1 step of 0.01 s: 200 steps are 2 s at
100 Hz), HalfCheetah-v5 and gym's v2 take 5 (0.05 s: 10 s at 20 Hz).

All copies take a step in one call of MuJoCo's rollout (mujoco.rollout: the frame_skip substeps of every copy in
C, on `threads` threads) from their states, instead of a Python loop over gymnasium's step: the same physics
(states equal to 1e-14 over 5 steps), 1.5x the loop's speed on 800 copies (benchmarks/rl_envs.py). Resets go
through gymnasium's HalfCheetah-v5 (its seeded generator).

`mujoco` is imported only when an environment is built or checked (the `rl` extra), so a missing one is a
one-line ConfigError naming the extra, and data=navigation2d runs without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from metalight.envs.vector import copy_seeds, given_tasks, pooled, require
from metalight.errors import ConfigError

# the `rl` extra; metalight.envs lists the environments and turns a missing one into a ConfigError
import gymnasium
from gymnasium.vector import AutoresetMode, VectorEnv

CONTROL_COST = 0.5 * 0.1  # the references' 1e-1 * 0.5 * sum(a^2)
CONVENTIONS = ("rllab", "gymnasium")
RLLAB_QPOS_STD, RLLAB_QVEL_STD = 0.01, 0.1  # rllab's MujocoEnv.reset_mujoco: normal noise on the initial qpos and qvel


class HalfCheetahTasks(VectorEnv):
    """num_envs HalfCheetah-v5 simulators stepped together, each with its own task; the reward of the task family `family`.

    reset(options={"tasks": [num_envs, 1]}) sets each copy's task (kept when not given) and puts it at the
    model's start state plus the convention's noise, drawn from the copy's seed (reset(seed=[one per copy]); the
    sampler gives each task x rollout its own, policy_gradient.start_seeds): the same seeds replay the same episodes.
    step(actions [num_envs, 6]) advances every copy frame_skip MuJoCo steps and returns (observations
    [num_envs, 20], rewards, terminated (never), truncated (after `horizon` steps), info with the forward velocities
    and control costs). Tensors in, tensors out (float32, on the tasks' device); nothing resets by itself.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}
    observation_dim = 20
    action_dim = 6
    task_dim = 1
    family: ClassVar[str] = ""  # "direction" or "velocity" (the subclasses)
    env_name: ClassVar[str] = ""

    def __init__(
        self,
        num_envs: int,
        horizon: int = 200,
        frame_skip: int = 5,
        convention: str = "gymnasium",
        reset_noise_scale: float = 0.1,
        threads: int = 1,
        **task_options: Any,
    ) -> None:
        self.check_options(frame_skip, convention, reset_noise_scale, threads, **task_options)
        import mujoco
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

        self.num_envs, self.horizon, self.convention = num_envs, horizon, convention
        # gymnasium's environments reset the copies (and the hand-written tests step them); rollout steps the states
        build = lambda: HalfCheetahEnv(frame_skip=frame_skip, reset_noise_scale=reset_noise_scale)  # noqa: E731
        self.sims = pooled(("halfcheetah", frame_skip, reset_noise_scale), num_envs, build)
        self.model = self.sims[0].model
        self.frame_skip, self.dt = frame_skip, self.model.opt.timestep * frame_skip  # the time of one action
        self.rollout_data = [mujoco.MjData(self.model) for _ in range(threads)]
        self.com_data = mujoco.MjData(self.model)  # the rllab convention's centre-of-mass kinematics, one copy at a time
        self.torso_id = self.model.body("torso").id
        self.state_spec = mujoco.mjtState.mjSTATE_FULLPHYSICS  # time, qpos, qvel (HalfCheetah has no activations)
        self.states = np.zeros((num_envs, mujoco.mj_stateSize(self.model, self.state_spec)))
        nq, nv = self.model.nq, self.model.nv
        self.qpos, self.qvel = slice(1, 1 + nq), slice(1 + nq, 1 + nq + nv)
        self.torso_offset = self.model.body("torso").pos.copy()
        box = gymnasium.spaces.Box
        self.single_observation_space = box(-np.inf, np.inf, (20,), np.float32)
        self.single_action_space = box(-1.0, 1.0, (6,), np.float32)
        self.observation_space = box(-np.inf, np.inf, (num_envs, 20), np.float32)
        self.action_space = box(-1.0, 1.0, (num_envs, 6), np.float32)
        self.copy_models: list[Any] | None = None  # one MjModel per copy where the bodies differ (None: all share self.model)
        self._tasks: Tensor | None = None
        self._goals: np.ndarray | None = None
        self._t = 0

    @classmethod
    def check_options(cls, frame_skip: int = 5, convention: str = "gymnasium", reset_noise_scale: float = 0.1, threads: int = 1, **task_options: Any) -> None:
        """ConfigError unless mujoco is installed and the options are numbers of the right range (TypeError for unknown names)."""
        require("mujoco", cls.env_name)
        if isinstance(frame_skip, bool) or not isinstance(frame_skip, int) or frame_skip < 1:
            raise ConfigError(f"data.env_options.frame_skip={frame_skip!r} must be a whole number >= 1 (MuJoCo steps per action: Finn et al.'s rllab 1, HalfCheetah-v5 5).")
        if convention not in CONVENTIONS:
            raise ConfigError(f"data.env_options.convention={convention!r} is not known: use rllab (Finn et al.'s code) or gymnasium (HalfCheetah-v5).")
        if isinstance(reset_noise_scale, bool) or not isinstance(reset_noise_scale, (int, float)) or reset_noise_scale < 0:
            raise ConfigError(f"data.env_options.reset_noise_scale={reset_noise_scale!r} must be a number >= 0 (HalfCheetah-v5: 0.1).")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"data.env_options.threads={threads!r} must be a whole number >= 1 (MuJoCo's threads stepping the copies).")
        cls.check_task_options(**task_options)

    @classmethod
    def check_task_options(cls) -> None:
        """The task distribution's options (the subclasses'; none for directions)."""

    def observe(self, qpos: np.ndarray, qvel: np.ndarray, torso: np.ndarray) -> np.ndarray:
        """The references' observation [num_envs, 20]: qpos without the root's x, qvel, and the torso's 3 numbers (torso [num_envs, 3])."""
        return np.concatenate([qpos[:, 1:], qvel, torso], 1)

    def torso_position(self, torso_qpos: np.ndarray) -> np.ndarray:
        """The torso body's position [num_envs, 3] where gymnasium's get_body_com("torso") puts it after a step: MuJoCo's
        kinematics of the last substep's start (torso_qpos), the body's offset plus the root's x and z slides."""
        return np.stack([torso_qpos[:, 0], np.zeros(len(torso_qpos)), torso_qpos[:, 1]], 1) + self.torso_offset

    def centre_of_mass(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position [num_envs, 3], velocity [num_envs, 3]) of the cheetah's centre of mass (the torso's subtree) in each
        state: rllab's get_body_com("torso") and get_body_comvel("torso"), MuJoCo's subtree_com and subtree_linvel."""
        import mujoco

        data, position, velocity = self.com_data, np.empty((len(states), 3)), np.empty((len(states), 3))
        models = self.copy_models or [self.model] * len(states)
        for i, (state, model) in enumerate(zip(states, models)):
            mujoco.mj_setState(model, data, state, self.state_spec)
            mujoco.mj_kinematics(model, data)
            mujoco.mj_comPos(model, data)
            mujoco.mj_comVel(model, data)
            mujoco.mj_subtreeVel(model, data)
            position[i], velocity[i] = data.subtree_com[self.torso_id], data.subtree_linvel[self.torso_id]
        return position, velocity

    def task_reward(self, velocity: np.ndarray) -> np.ndarray:
        """The task term of the reward from the forward velocities [num_envs] (the subclasses')."""
        raise NotImplementedError

    def set_tasks(self, tasks: np.ndarray) -> None:
        """Take the tasks [num_envs, task_dim] reset() was given (here the goal of each copy; a body's subclass changes its physics)."""
        self._goals = tasks[:, 0]

    def applied_actions(self, clipped: np.ndarray) -> np.ndarray:
        """The actions [num_envs, 6] MuJoCo applies and the control cost is taken on: the clipped ones (a crippled body zeroes a joint)."""
        return clipped

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every copy back at a (noisy) start state of its seed (copy_seeds), with the tasks options["tasks"] [num_envs, 1] (kept when not given)."""
        tasks = given_tasks(options, self.num_envs, self.task_dim)
        if tasks is not None:
            self._tasks = tasks
            self.set_tasks(tasks.detach().cpu().double().numpy())
        if self._tasks is None:
            raise ValueError("reset(options={'tasks': tasks}) first: each environment needs its task")
        import mujoco

        for i, (sim, copy_seed) in enumerate(zip(self.sims, copy_seeds(seed, self.num_envs))):
            sim.reset(seed=copy_seed)  # gymnasium's noise, from the copy's seeded generator
            if self.convention == "rllab":  # rllab's noise instead, from the same generator
                noise = sim.np_random.standard_normal(self.model.nq + self.model.nv)
                sim.set_state(sim.init_qpos + RLLAB_QPOS_STD * noise[: self.model.nq], sim.init_qvel + RLLAB_QVEL_STD * noise[self.model.nq :])
            mujoco.mj_getState(sim.model, sim.data, self.states[i], self.state_spec)
        qpos, qvel = self.states[:, self.qpos], self.states[:, self.qvel]
        if self.convention == "rllab":
            torso = self.centre_of_mass(self.states)[0]
        else:
            torso = np.stack([sim.get_body_com("torso") for sim in self.sims])
        observations = self.observe(qpos, qvel, torso)
        self._t = 0
        return self._tensor(observations), {}

    def _tensor(self, array: np.ndarray) -> Tensor:
        """array as float32 on the tasks' device."""
        return torch.as_tensor(array, dtype=torch.float32).to(self._tasks.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """One step of every copy: (observations, rewards, terminated, truncated, {"x_velocity", "reward_ctrl"})."""
        if self._tasks is None:
            raise ValueError("call reset() before step()")
        from mujoco import rollout

        applied = self.applied_actions(np.clip(torch.as_tensor(actions).detach().cpu().double().numpy(), -1.0, 1.0))
        before = self.states.copy()
        x_before = before[:, self.qpos][:, 0]
        data = self.rollout_data if len(self.rollout_data) > 1 else self.rollout_data[0]
        model = self.copy_models or self.model  # rollout takes one model, or one per copy (the same sizes)
        trajectory, _ = rollout.rollout(model, data, self.states, applied[:, None, :], nstep=self.frame_skip)
        self.states = np.ascontiguousarray(trajectory[:, -1])
        qpos, qvel = self.states[:, self.qpos], self.states[:, self.qvel]
        if self.convention == "rllab":
            torso, com_velocity = self.centre_of_mass(self.states)
            velocity = com_velocity[:, 0]
        else:
            velocity = (qpos[:, 0] - x_before) / self.dt  # the root's x over the time of one action
            # the first substep's start is the state before the step (not in the trajectory, which starts after it)
            torso = self.torso_position(trajectory[:, -2, self.qpos] if self.frame_skip > 1 else before[:, self.qpos])
        observations = self.observe(qpos, qvel, torso)
        control = CONTROL_COST * (applied**2).sum(-1)
        reward = self.task_reward(velocity) - control
        self._t += 1
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self._tasks.device)
        truncated = torch.full_like(terminated, self._t >= self.horizon)
        return self._tensor(observations), self._tensor(reward), terminated, truncated, {"x_velocity": velocity, "reward_ctrl": -control}


class HalfCheetahDirection(HalfCheetahTasks):
    """data=halfcheetah_dir: run forward (task +1) or backward (task -1); r = direction * velocity - control cost."""

    family, env_name = "direction", "halfcheetah_dir"

    @staticmethod
    def draw_task(rng: np.random.Generator, **options: Any) -> np.ndarray:
        """One direction, +1 or -1 with probability 1/2, drawn as the authors draw it: -1 if uniform(0, 2) < 1 else +1."""
        return np.array([-1.0 if rng.uniform(0.0, 2.0) < 1.0 else 1.0])

    def task_reward(self, velocity: np.ndarray) -> np.ndarray:
        """direction * forward velocity."""
        return self._goals * velocity


class HalfCheetahVelocity(HalfCheetahTasks):
    """data=halfcheetah_vel: run at the task's target velocity; r = -|velocity - goal| - control cost."""

    family, env_name = "velocity", "halfcheetah_vel"

    @staticmethod
    def draw_task(rng: np.random.Generator, velocity_range: tuple[float, float] = (0.0, 2.0), **options: Any) -> np.ndarray:
        """One target velocity, uniform in velocity_range (Finn et al. and pytorch-maml-rl: [0, 2])."""
        return np.array([rng.uniform(velocity_range[0], velocity_range[1])])

    @classmethod
    def check_task_options(cls, velocity_range: tuple[float, float] = (0.0, 2.0)) -> None:
        """ConfigError unless velocity_range is [low, high] with low < high."""
        ok = isinstance(velocity_range, (list, tuple)) and len(velocity_range) == 2 and all(isinstance(v, (int, float)) for v in velocity_range)
        if not ok or not velocity_range[0] < velocity_range[1]:
            raise ConfigError(f"data.env_options.velocity_range={velocity_range!r} must be [low, high] with low < high, e.g. [0.0, 2.0].")

    def task_reward(self, velocity: np.ndarray) -> np.ndarray:
        """Minus the distance of the forward velocity to the target."""
        return -np.abs(velocity - self._goals)
