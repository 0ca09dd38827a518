"""Policy-gradient pieces of meta-RL: batched rollouts, returns, the linear feature baseline, GAE, Gaussian log-likelihoods and KL.

Everything is batched over tasks and rollouts: tensors are [B tasks, R rollouts, T steps, ...], with a mask
[B, R, T] that is 1 while an episode runs. Conventions follow pytorch-maml-rl (the PyTorch reproduction of
Finn et al.'s rllab code): discounted returns fit a linear baseline on Duan et al.'s features per task,
advantages are GAE on that baseline, normalized per task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from metalight.errors import ConfigError
from metalight.tasks.rl import TaskEnvironment

Policy = Callable[[Tensor], tuple[Tensor, Tensor]]  # observations [B, R, O] -> (mean [B, R, A], std broadcastable to it)
# called after every environment step with (actions [B, R, A], rewards [B, R], alive [B, R]: 1 where the step was live):
# what a recurrent policy (RL²) reads to carry its state to the next step
StepObserver = Callable[[Tensor, Tensor, Tensor], None]


class Rollouts(NamedTuple):
    """Episodes of every task of a meta-batch: observations [B, R, T, O], actions [B, R, T, A], rewards and mask [B, R, T]."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor


def phase_seed(seed: int, phase: int) -> int:
    """The seed of a task's exploration noise in sampling phase `phase` (0, 1, ...: before and after each adaptation step)."""
    return int(np.random.SeedSequence([seed, phase]).generate_state(1)[0])


def start_seeds(seeds: Tensor, rollouts: int) -> list[int]:
    """The reset seed of each task x rollout copy (its start-state noise, e.g. HalfCheetah's): a function of the
    task's seed and the rollout's index only, so each training task starts from fresh states, and a task starts each
    of its sampling phases (before and after every adaptation step) from the same ones, as a fixed val/test task does at
    every validation."""
    return [int(np.random.SeedSequence(s, spawn_key=(r,)).generate_state(1)[0]) for s in seeds.tolist() for r in range(rollouts)]


def sample_rollouts(
    environment: TaskEnvironment, act: Policy, tasks: Tensor, seeds: Tensor, phase: int, rollouts: int, observe: StepObserver | None = None
) -> Rollouts:
    """`rollouts` episodes of every task (parameters tasks [B, task_dim]) under the Gaussian policy `act`, all in one vector environment.

    Actions are mean + std * noise, the noise of task b drawn from its own generator (seeds[b], phase): a
    task's episodes do not depend on the other tasks of its batch; its start states come from start_seeds. The stored actions are the sampled ones
    (the environment clips what it applies), as the references store them. No gradient flows through sampling.
    observe, given, sees every step's actions, rewards and live mask (a recurrent policy's state, tasks x rollouts).
    """
    n_tasks, horizon, action_dim = len(tasks), environment.horizon, environment.action_dim
    noise = torch.stack(
        [torch.randn(rollouts, horizon, action_dim, generator=torch.Generator().manual_seed(phase_seed(s, phase))) for s in seeds.tolist()]
    ).to(tasks)
    env = environment.make(n_tasks * rollouts)
    observation, _ = env.reset(seed=start_seeds(seeds, rollouts), options={"tasks": tasks.repeat_interleave(rollouts, dim=0)})
    observation = observation.view(n_tasks, rollouts, -1)
    alive = torch.ones(n_tasks, rollouts, dtype=tasks.dtype, device=tasks.device)
    observations, actions, rewards, mask = [], [], [], []
    with torch.no_grad():
        for t in range(horizon):
            mean, std = act(observation)
            action = mean + std * noise[:, :, t]
            next_observation, reward, terminated, _, _ = env.step(action.reshape(n_tasks * rollouts, action_dim))
            observations.append(observation)
            actions.append(action)
            rewards.append(reward.view(n_tasks, rollouts) * alive)
            mask.append(alive)
            if observe is not None:
                observe(action, reward.view(n_tasks, rollouts), alive)
            alive = alive * (~terminated).view(n_tasks, rollouts).to(alive.dtype)
            observation = next_observation.view(n_tasks, rollouts, -1)
    return Rollouts(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2), torch.stack(mask, 2))


def check_discounts(gamma: float, gae_lambda: float) -> None:
    """ConfigError unless the discount and GAE's lambda are numbers in [0, 1]."""
    for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"algo.{name}={value!r} is not valid: use a number in [0, 1] (Finn et al.: gamma 0.99, lambda 1.0).")


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Rewards-to-go sum_{k >= t} gamma^(k - t) r_k of each step, [..., T] (zero after an episode ended)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] * mask[..., t] + gamma * running
        returns[..., t] = running
    return returns


FEATURE_CLIP = 10.0  # rllab's LinearFeatureBaseline clips observations to +-10 (pytorch-maml-rl's does not)


def baseline_features(observations: Tensor, mask: Tensor) -> Tensor:
    """Duan et al.'s (2016) linear-baseline features of each step: o, o^2, t/100, (t/100)^2, (t/100)^3, 1 (masked), [..., T, 2 * O + 4].

    o is the observation clipped to +-FEATURE_CLIP, as in Finn et al.'s rllab code (a HalfCheetah's joint
    velocities pass 10; 2-D navigation's positions stay far inside).
    """
    m = mask.unsqueeze(-1)
    o = observations.clamp(-FEATURE_CLIP, FEATURE_CLIP) * m
    t = torch.arange(observations.shape[-2], dtype=observations.dtype, device=observations.device).view(-1, 1) * m / 100.0
    return torch.cat([o, o**2, t, t**2, t**3, m], dim=-1)


def fit_linear_baseline(rollouts: Rollouts, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Values [B, R, T] of the baseline fitted by ridge regression of each task's returns on its features (Duan et al. 2016).

    Solves (X^T X + reg I) w = X^T y per task, in float64; as the references, the regularization grows
    tenfold (up to 5 times) while the system cannot be solved.
    """
    features = baseline_features(rollouts.observations, rollouts.mask)
    x = features.flatten(1, 2).double()  # [B, R*T, F]
    y = returns.flatten(1, 2).double().unsqueeze(-1)
    gram, target = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(5):
        weights, info = torch.linalg.solve_ex(gram + reg * eye, target)
        if not bool(info.any()) and bool(torch.isfinite(weights).all()):
            break
        reg *= 10
    return (features.double() @ weights.unsqueeze(1)).squeeze(-1).to(returns.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimates [..., T] (Schulman et al. 2016): deltas r + gamma V' - V summed with weights (gamma lam)^k."""
    values = values * mask
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = deltas[..., t] + gamma * lam * running
        advantages[..., t] = running
    return advantages * mask


def normalize_per_task(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """values [B, ...] minus each task's mean over its live steps, divided by that standard deviation (+ eps); zero where mask is."""
    dims = tuple(range(1, values.dim()))
    count = mask.sum(dims, keepdim=True).clamp(min=1)
    mean = (values * mask).sum(dims, keepdim=True) / count
    std = (((values - mean) * mask) ** 2).sum(dims, keepdim=True).div(count).sqrt()
    return (values - mean) / (std + eps) * mask


def advantages(rollouts: Rollouts, gamma: float, lam: float, reg: float = 1e-5, normalize: bool = True) -> Tensor:
    """The advantages [B, R, T] of every step: GAE on the per-task linear baseline, normalized per task (pytorch-maml-rl's defaults)."""
    returns = discounted_returns(rollouts.rewards, rollouts.mask, gamma)
    values = fit_linear_baseline(rollouts, returns, reg)
    result = gae(rollouts.rewards, values, rollouts.mask, gamma, lam)
    return normalize_per_task(result, rollouts.mask) if normalize else result


def gaussian_log_prob(mean: Tensor, std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, diag(std^2)) summed over the action dimensions."""
    z = (actions - mean) / std
    return (-0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)).expand_as(actions).sum(-1)


def gaussian_kl(mean: Tensor, std: Tensor, old_mean: Tensor, old_std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(old_mean, old_std^2)) summed over the action dimensions (the direction pytorch-maml-rl's TRPO takes)."""
    kl = (old_std / std).log() + (std**2 + (mean - old_mean) ** 2) / (2 * old_std**2) - 0.5
    return kl.expand_as(mean).sum(-1)
