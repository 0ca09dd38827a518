"""Rollout throughput of the meta-RL sampler on one core (data=navigation2d): environment steps per second, metalight's against the references' orders.

    python benchmarks/rl_sampler.py [--tasks 20] [--rollouts 20] [--horizon 100] [--repeats 5]

metalight: its sampler (algorithms/policy_gradient.sample_rollouts), every task x every rollout a row of one vector
environment, one policy call per time step (each task with its own weights, by vmap).
pytorch_maml_rl, finn_vectorized, one_at_a_time: the references' orders on the same vector environment and policy
(benchmarks/rl_references.py): a vector environment of the rollouts per task with one policy call per step
(pytorch-maml-rl), one environment per task with one policy call per step across tasks (Finn et al.'s
VectorizedSampler), and one environment stepped by batch-1 calls. Same policy (2 x 100 ReLU Gaussian MLP). Prints
one JSON object: the median steps per second of each over --repeats (interleaved), metalight's ratio to each.
"""

from __future__ import annotations

import argparse
import json

import torch

from metalight.algorithms import MAMLRL
from metalight.algorithms.rl.policy_gradient import sample_rollouts
from metalight.models import GaussianMLP
from metalight.tasks import RLDataModule

import rl_references as ref


def main() -> None:
    """Measure the four samplers and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    datamodule = RLDataModule(horizon=args.horizon, rollouts=args.rollouts, meta_batch_size=args.tasks)
    datamodule.setup()
    algorithm = MAMLRL(GaussianMLP())
    algorithm.use_task_kind(datamodule.kind)
    batch = datamodule.tasks("train")[[(0, i) for i in range(args.tasks)]]
    params = algorithm.per_task({k: v.detach() for k, v in algorithm.model.named_parameters()}, args.tasks)
    tasks, make, model, horizon = batch["tasks"], datamodule.make_env, algorithm.model, args.horizon
    runs = {
        "metalight": lambda: sample_rollouts(datamodule.environment, lambda o: algorithm.policy(params, o), tasks, batch["seeds"], 0, args.rollouts),
        "pytorch_maml_rl": lambda: ref.pytorch_maml_rl(make, model, tasks, args.rollouts, horizon),
        "finn_vectorized": lambda: ref.finn_vectorized(make, algorithm.policy, params, tasks, args.rollouts, horizon),
        "one_at_a_time": lambda: ref.one_at_a_time(make, model, tasks, args.rollouts, horizon),
    }
    steps = args.tasks * args.rollouts * args.horizon
    result = {"tasks": args.tasks, "rollouts": args.rollouts, "horizon": args.horizon, "env_steps": steps, "repeats": args.repeats}
    print(json.dumps({**result, **ref.summary(ref.measure(runs, args.repeats), steps), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
