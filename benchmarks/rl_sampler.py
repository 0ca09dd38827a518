"""Rollout throughput of the meta-RL sampler on one core: environment steps per second, batched vs one environment at a time.

    python benchmarks/rl_sampler.py [--tasks 20] [--rollouts 20] [--horizon 100] [--repeats 3]

batched: metalight's sampler (algorithms/policy_gradient.sample_rollouts), every task x every rollout as a row of
one vector environment, one policy call per time step (each task with its own weights, by vmap).
sequential: what most reference code does (one environment per task, pytorch-maml-rl's and rllab's samplers
without their worker processes): for each task and each rollout, one environment stepped with one policy call per
step. Same policy (2 x 100 ReLU Gaussian MLP), same data=navigation2d environment. Prints one JSON object:
environment steps per second of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metalight.algorithms import MAMLRL
from metalight.algorithms.policy_gradient import sample_rollouts
from metalight.models import GaussianMLP
from metalight.tasks import RLDataModule


def sequential(datamodule: RLDataModule, model: torch.nn.Module, tasks: torch.Tensor, rollouts: int) -> None:
    """One task, one rollout, one environment at a time: the reference samplers' order."""
    env = datamodule.make_env(1)
    with torch.no_grad():
        for goal in tasks:
            for _ in range(rollouts):
                observation, _ = env.reset(options={"tasks": goal.view(1, 2)})
                for _ in range(datamodule.horizon):
                    mean, std = model(observation)
                    observation, *_ = env.step(mean + std * torch.randn_like(mean))


def main() -> None:
    """Measure both samplers, best of --repeats, and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    datamodule = RLDataModule(horizon=args.horizon, rollouts=args.rollouts, meta_batch_size=args.tasks)
    datamodule.setup()
    algorithm = MAMLRL(GaussianMLP())
    algorithm.use_task_kind(datamodule.kind)
    batch = datamodule.tasks("train")[[(0, i) for i in range(args.tasks)]]
    params = algorithm.per_task({k: v.detach() for k, v in algorithm.model.named_parameters()}, args.tasks)
    steps = args.tasks * args.rollouts * args.horizon
    timings: dict[str, float] = {"batched": float("inf"), "sequential": float("inf")}
    for _ in range(args.repeats):
        start = time.perf_counter()
        sample_rollouts(datamodule.environment, lambda o: algorithm.policy(params, o), batch["tasks"], batch["seeds"], 0, args.rollouts)
        timings["batched"] = min(timings["batched"], time.perf_counter() - start)
        start = time.perf_counter()
        sequential(datamodule, algorithm.model, batch["tasks"], args.rollouts)
        timings["sequential"] = min(timings["sequential"], time.perf_counter() - start)
    result = {
        "tasks": args.tasks, "rollouts": args.rollouts, "horizon": args.horizon, "env_steps": steps,
        "batched_steps_per_s": round(steps / timings["batched"]), "sequential_steps_per_s": round(steps / timings["sequential"]),
        "ratio": round(timings["sequential"] / timings["batched"], 1), "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
