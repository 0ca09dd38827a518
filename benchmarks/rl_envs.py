"""Rollout throughput of the MuJoCo meta-RL environments on one core: environment steps per second, batched vs one environment at a time.

    python benchmarks/rl_envs.py [--env halfcheetah_dir] [--task reach] [--tasks 40] [--rollouts 20] [--horizon 200] [--repeats 2]

batched: metalight's sampler (algorithms/policy_gradient.sample_rollouts) on the vector environment of --env
(tasks/halfcheetah.py, tasks/meta_world.py): every task x every rollout a copy of the simulator, one policy call
per time step for all of them (each task with its own weights, by vmap); HalfCheetah's copies stepped by one call
of mujoco.rollout, Meta-World's in a Python loop.
sequential: the reference samplers without their worker processes (rllab's, pytorch-maml-rl's): for each task
and each rollout, one environment stepped with one policy call per step (HalfCheetah: a plain gymnasium
HalfCheetah-v5 with the task's reward computed beside it; Meta-World: the vector environment with one copy).
env_only: the vector environment's step alone on random actions (no policy), for the simulator's share.
Same policy (2 x 100 ReLU Gaussian MLP). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from metalight.algorithms import MAMLRL
from metalight.algorithms.policy_gradient import sample_rollouts
from metalight.models import GaussianMLP
from metalight.tasks.meta_world import MetaWorldML1DataModule
from metalight.tasks.rl import RLDataModule


class ReferenceCheetah:
    """One HalfCheetah as the references run it: gymnasium's HalfCheetah-v5 stepped alone, the task's reward computed in Python."""

    def __init__(self, family: str) -> None:
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

        self.env, self.family, self.goal = HalfCheetahEnv(), family, 0.0

    def reset(self, task: torch.Tensor) -> torch.Tensor:
        self.goal = float(task[0])
        self.env.reset()
        return self.observe()

    def observe(self) -> torch.Tensor:
        data = self.env.data
        return torch.from_numpy(np.concatenate([data.qpos[1:], data.qvel, self.env.get_body_com("torso")])).float().view(1, -1)

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, float]:
        clipped = np.clip(action.view(-1).double().numpy(), -1, 1)
        _, _, _, _, info = self.env.step(clipped)
        velocity = info["x_velocity"]
        reward = (self.goal * velocity if self.family == "direction" else -abs(velocity - self.goal)) - 0.05 * float(np.sum(clipped**2))
        return self.observe(), reward


def sequential(datamodule: RLDataModule, model: torch.nn.Module, tasks: torch.Tensor, rollouts: int) -> None:
    """One task, one rollout, one environment at a time: the reference samplers' order (HalfCheetah: a plain HalfCheetah-v5)."""
    if datamodule.env.startswith("halfcheetah"):
        env = ReferenceCheetah(datamodule.env_class.family)
        reset, step = env.reset, lambda action: env.step(action)[0]
    else:
        vector = datamodule.make_env(1)
        reset = lambda task: vector.reset(options={"tasks": task.view(1, -1)})[0]  # noqa: E731
        step = lambda action: vector.step(action)[0]  # noqa: E731
    with torch.no_grad():
        for task in tasks:
            for _ in range(rollouts):
                observation = reset(task)
                for _ in range(datamodule.horizon):
                    mean, std = model(observation)
                    observation = step(mean + std * torch.randn_like(mean))


def env_only(datamodule: RLDataModule, tasks: torch.Tensor, rollouts: int) -> None:
    """The vector environment of all tasks x rollouts stepped on random actions."""
    env = datamodule.make_env(len(tasks) * rollouts)
    env.reset(options={"tasks": tasks.repeat_interleave(rollouts, dim=0)})
    for _ in range(datamodule.horizon):
        env.step(torch.randn(env.num_envs, datamodule.environment.action_dim))


def main() -> None:
    """Measure the three, best of --repeats, and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="halfcheetah_dir", choices=["halfcheetah_dir", "halfcheetah_vel", "metaworld_ml1"])
    parser.add_argument("--task", default="reach", help="the Meta-World skill (--env metaworld_ml1)")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dict(horizon=args.horizon, rollouts=args.rollouts, meta_batch_size=args.tasks)
    if args.env == "metaworld_ml1":
        datamodule = MetaWorldML1DataModule(env_options={"task": args.task}, **settings)
    else:
        datamodule = RLDataModule(env=args.env, **settings)
    datamodule.setup()
    environment = datamodule.environment
    algorithm = MAMLRL(GaussianMLP(environment.observation_dim, environment.action_dim))
    algorithm.use_task_kind(datamodule.kind)
    batch = datamodule.tasks("train")[[(0, i) for i in range(args.tasks)]]
    params = algorithm.per_task({k: v.detach() for k, v in algorithm.model.named_parameters()}, args.tasks)
    steps = args.tasks * args.rollouts * args.horizon
    datamodule.make_env(args.tasks * args.rollouts)  # build the simulators once (kept for later vector environments)
    runs = {
        "batched": lambda: sample_rollouts(environment, lambda o: algorithm.policy(params, o), batch["tasks"], batch["seeds"], 0, args.rollouts),
        "sequential": lambda: sequential(datamodule, algorithm.model, batch["tasks"], args.rollouts),
        "env_only": lambda: env_only(datamodule, batch["tasks"], args.rollouts),
    }
    timings = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name] = min(timings[name], time.perf_counter() - start)
    result = {
        "env": args.env + (f":{args.task}" if args.env == "metaworld_ml1" else ""), "tasks": args.tasks, "rollouts": args.rollouts,
        "horizon": args.horizon, "env_steps": steps, **{f"{name}_steps_per_s": round(steps / t) for name, t in timings.items()},
        "ratio": round(timings["sequential"] / timings["batched"], 2), "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
