"""The reference samplers' orders of stepping and policy calls, for benchmarks/rl_sampler.py and rl_envs.py.

Each loop samples `rollouts` episodes of `horizon` steps for every task, on metalight's own vector environment
(`make(num_envs)`), so a ratio between them and metalight's sampler measures the order of work, not the simulator.
Written for these benchmarks from the references' code (no worker processes, one core):

- pytorch_maml_rl: tristandeleu/pytorch-maml-rl's MultiTaskSampler: for each task, a vector environment of
  `rollouts` copies of it (SyncVectorEnv of fast-batch-size 20), one policy call per step on those copies.
  tasks x horizon policy calls.
- finn_vectorized: cbfinn/maml_rl's VectorizedSampler (n_envs = meta_batch_size): one environment per task, each
  running its task's episodes one after the other, one policy call per step across all tasks (each task's
  observation through its own adapted weights, MAMLGaussianMLPPolicy.get_actions). rollouts x horizon calls.
- one_at_a_time: one environment, one task and one rollout at a time, a batch-1 policy call per step (rllab's
  sampler and pytorch-maml-rl's without their vector environments). tasks x rollouts x horizon calls.

metalight's sample_rollouts makes horizon calls: every task x rollout in one vector environment.
`policy(params, observations [B, R, O])` is the learner's per-task policy (MAMLRL.policy), `params` its weights
batched over the tasks; `model` the plain network (the same weights for every task, as before adaptation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Policy = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def pytorch_maml_rl(make: Callable[[int], Any], model: torch.nn.Module, tasks: torch.Tensor, rollouts: int, horizon: int) -> None:
    """For each task: a vector environment of its `rollouts` copies, one policy call per step on them."""
    env = make(rollouts)
    with torch.no_grad():
        for task in tasks:
            observation, _ = env.reset(options={"tasks": task.view(1, -1).repeat(rollouts, 1)})
            for _ in range(horizon):
                mean, std = model(observation)
                observation, *_ = env.step(mean + std * torch.randn_like(mean))


def finn_vectorized(make: Callable[[int], Any], policy: Policy, params: dict[str, torch.Tensor], tasks: torch.Tensor, rollouts: int, horizon: int) -> None:
    """One environment per task, episodes one after the other, one policy call per step across the tasks (their own weights)."""
    env = make(len(tasks))
    with torch.no_grad():
        for _ in range(rollouts):
            observation, _ = env.reset(options={"tasks": tasks})
            for _ in range(horizon):
                mean, std = policy(params, observation.unsqueeze(1))
                action = mean + std * torch.randn_like(mean)
                observation, *_ = env.step(action.squeeze(1))


def one_at_a_time(make: Callable[[int], Any], model: torch.nn.Module, tasks: torch.Tensor, rollouts: int, horizon: int) -> None:
    """One task, one rollout, one environment at a time, a batch-1 policy call per step."""
    env = make(1)
    with torch.no_grad():
        for task in tasks:
            for _ in range(rollouts):
                observation, _ = env.reset(options={"tasks": task.view(1, -1)})
                for _ in range(horizon):
                    mean, std = model(observation)
                    observation, *_ = env.step(mean + std * torch.randn_like(mean))


def measure(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, `repeats` times, the runs interleaved (so a change of load touches them all alike)."""
    import time

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: dict[str, list[float]], steps: int, ours: str = "metalight") -> dict[str, Any]:
    """Median environment steps per second of each run, the ratio of `ours` to each other (median times), and every time."""
    import statistics

    median = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        **{f"{name}_steps_per_s": round(steps / t) for name, t in median.items()},
        **{f"{ours}_over_{name}": round(t / median[ours], 2) for name, t in median.items() if name != ours},
        "seconds": {name: [round(t, 3) for t in times] for name, times in seconds.items()},
    }
