"""Rollout throughput of the MuJoCo meta-RL environments on one core: environment steps per second, metalight's sampler against the references' orders.

    python benchmarks/rl_envs.py [--env halfcheetah_dir] [--frame-skip 1] [--convention rllab] [--task reach] \
        [--tasks 40] [--rollouts 20] [--horizon 200] [--repeats 3]

metalight: its sampler (algorithms/policy_gradient.sample_rollouts) on the vector environment of --env
(envs/halfcheetah.py, envs/meta_world.py): every task x every rollout a copy of the simulator, one policy call
per time step for all of them (each task with its own weights, by vmap); HalfCheetah's copies stepped by one call
of mujoco.rollout, Meta-World's in a Python loop.
pytorch_maml_rl, finn_vectorized, one_at_a_time: the references' orders on the same vector environment and policy
(benchmarks/rl_references.py): per task a vector environment of its rollouts, one policy call per step
(pytorch-maml-rl); one environment per task, one policy call per step across tasks (Finn et al.'s
VectorizedSampler); one environment stepped by batch-1 policy calls.
env_only: the vector environment's step alone on random actions (no policy), for the simulator's share.
HalfCheetah's physics: --frame-skip and --convention (data.env_options; experiment=halfcheetah_dir's: 1, rllab).
Same policy (2 x 100 ReLU Gaussian MLP). Prints one JSON object: median steps per second over --repeats
(interleaved), metalight's ratio to each.
"""

from __future__ import annotations

import argparse
import json

import torch

from metalight.algorithms import MAMLRL
from metalight.algorithms.rl.policy_gradient import sample_rollouts
from metalight.models import GaussianMLP
from metalight.tasks.meta_world import MetaWorldDataModule
from metalight.tasks.rl import RLDataModule

import rl_references as ref


def env_only(datamodule: RLDataModule, tasks: torch.Tensor, rollouts: int) -> None:
    """The vector environment of all tasks x rollouts stepped on random actions."""
    env = datamodule.make_env(len(tasks) * rollouts)
    env.reset(options={"tasks": tasks.repeat_interleave(rollouts, dim=0)})
    for _ in range(datamodule.horizon):
        env.step(torch.randn(env.num_envs, datamodule.environment.action_dim))


def main() -> None:
    """Measure the five and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="halfcheetah_dir", choices=["halfcheetah_dir", "halfcheetah_vel", "metaworld_ml1"])
    parser.add_argument("--frame-skip", type=int, default=1, help="HalfCheetah's MuJoCo steps per action")
    parser.add_argument("--convention", default="rllab", choices=["rllab", "gymnasium"], help="HalfCheetah's start noise and centre of mass")
    parser.add_argument("--task", default="reach", help="the Meta-World skill (--env metaworld_ml1)")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dict(horizon=args.horizon, rollouts=args.rollouts, meta_batch_size=args.tasks)
    if args.env == "metaworld_ml1":
        datamodule = MetaWorldDataModule(env_options={"task": args.task}, n_val_tasks=10, **settings)
        name = f"{args.env}:{args.task}"
    else:
        datamodule = RLDataModule(env=args.env, env_options={"frame_skip": args.frame_skip, "convention": args.convention}, **settings)
        name = f"{args.env}:frame_skip={args.frame_skip},{args.convention}"
    datamodule.setup()
    environment = datamodule.environment
    algorithm = MAMLRL(GaussianMLP(environment.observation_dim, environment.action_dim))
    algorithm.use_task_kind(datamodule.kind)
    batch = datamodule.tasks("train")[[(0, i) for i in range(args.tasks)]]
    params = algorithm.per_task({k: v.detach() for k, v in algorithm.model.named_parameters()}, args.tasks)
    tasks, make, model, horizon = batch["tasks"], datamodule.make_env, algorithm.model, args.horizon
    # build the simulators once (kept for later vector environments; a Meta-World arm is built for its task's class at reset)
    make(args.tasks * args.rollouts).reset(options={"tasks": tasks.repeat_interleave(args.rollouts, dim=0)})
    runs = {
        "metalight": lambda: sample_rollouts(environment, lambda o: algorithm.policy(params, o), tasks, batch["seeds"], 0, args.rollouts),
        "pytorch_maml_rl": lambda: ref.pytorch_maml_rl(make, model, tasks, args.rollouts, horizon),
        "finn_vectorized": lambda: ref.finn_vectorized(make, algorithm.policy, params, tasks, args.rollouts, horizon),
        "one_at_a_time": lambda: ref.one_at_a_time(make, model, tasks, args.rollouts, horizon),
        "env_only": lambda: env_only(datamodule, tasks, args.rollouts),
    }
    steps = args.tasks * args.rollouts * args.horizon
    result = {"env": name, "tasks": args.tasks, "rollouts": args.rollouts, "horizon": args.horizon, "env_steps": steps, "repeats": args.repeats}
    print(json.dumps({**result, **ref.summary(ref.measure(runs, args.repeats), steps), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
