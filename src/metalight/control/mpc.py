"""Model-predictive control through a learned dynamics model adapted online (GrBAL, Nagabandi et al. 2019), and the
loop that runs a controller's episodes in a vector environment.

At every control step, each environment's model is first adapted to that environment's last `past` transitions
(learning_to_adapt's Sampler: from the meta-parameters each time, once more than `past` steps were taken; before,
the meta-parameters), then the planner picks the action through it. `adapt=None` plans with the meta-parameters
throughout: the same model without adaptation (MB-MPC's controller, and GrBAL's "no adaptation" comparison).
The model is given as functions, so this package needs nothing of metalight's learners:

    predict(weights, inputs [E, n, O + A]) -> normalized changes [E, n, O], weights holding a leading E dimension
    adapt(support_x [E, M, O + A], support_y [E, M, O]) -> weights [E, ...]
    next_observation(observations, normalized changes) and normalized_delta(observations, next) -> the model's units
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from metalight.control.planner import PlannerSettings, Reward, plan

Weights = dict[str, Tensor]
Act = Callable[[Tensor, Tensor], Tensor]  # (observations so far [E, t + 1, O], actions so far [E, t, A]) -> actions [E, A]


@dataclasses.dataclass(frozen=True)
class LearnedModel:
    """A dynamics model as the controller uses it: its meta-weights, how it predicts, and how it adapts (None: it does not)."""

    weights: Weights
    predict: Callable[[Weights, Tensor], Tensor]
    next_observation: Callable[[Tensor, Tensor], Tensor]
    normalized_delta: Callable[[Tensor, Tensor], Tensor]
    adapt: Callable[[Tensor, Tensor], Weights] | None = None

    def expanded(self, n: int) -> Weights:
        """The meta-weights repeated for n environments (views)."""
        return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in self.weights.items()}

    def weights_for(self, observations: Tensor, actions: Tensor, past: int) -> Weights:
        """Each environment's weights for its next step: adapted to its last `past` transitions when it has more than `past`
        observations and the model adapts (learning_to_adapt's condition), the meta-weights otherwise."""
        n, steps = actions.shape[0], actions.shape[1]
        if self.adapt is None or steps < past + 1:
            return self.expanded(n)
        before, taken, after = observations[:, -past - 1 : -1], actions[:, -past:], observations[:, -past:]
        return self.adapt(torch.cat([before, taken], -1), self.normalized_delta(before, after))

    def step(self, weights: Weights, observations: Tensor, actions: Tensor) -> Tensor:
        """Predicted next observations [E, C, O] of observations [E, C, O] and actions [E, C, A] under each environment's weights."""
        return self.next_observation(observations, self.predict(weights, torch.cat([observations, actions], -1)))


def model_predictive_controller(
    model: LearnedModel, settings: PlannerSettings, reward: Reward, action_dim: int, past: int, generator: torch.Generator
) -> Act:
    """The controller: adapt (when the model does), then plan through the model; the planner's noise from `generator`."""

    def act(observations: Tensor, actions: Tensor) -> Tensor:
        weights = model.weights_for(observations, actions, past)
        with torch.no_grad():
            return plan(settings, lambda o, a: model.step(weights, o, a), reward, observations[:, -1], generator, action_dim)

    return act


def random_controller(action_dim: int, low: float, high: float, generator: torch.Generator) -> Act:
    """Uniform actions in the box (learning_to_adapt's first iteration, initial_random_samples; the random baseline)."""

    def act(observations: Tensor, actions: Tensor) -> Tensor:
        shape = (observations.shape[0], action_dim)
        return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device).to(observations.dtype)

    return act


@dataclasses.dataclass(frozen=True)
class Episodes:
    """What episodes of a controller left: observations [E, T + 1, O], actions [E, T, A], rewards [E, T]."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor

    @property
    def returns(self) -> Tensor:
        """Each episode's undiscounted return [E]."""
        return self.rewards.sum(-1)


def run_episodes(env: object, tasks: Tensor, seeds: list[int], length: int, act: Act) -> Episodes:
    """One episode of `length` steps in each copy of the vector environment `env` (its tasks [E, task_dim], start seeds), acting with `act`."""
    first, _ = env.reset(seed=seeds, options={"tasks": tasks})
    n = first.shape[0]
    observations = first.new_zeros(n, length + 1, first.shape[-1], dtype=torch.float32)
    actions = first.new_zeros(n, length, env.action_dim, dtype=torch.float32)
    rewards = first.new_zeros(n, length, dtype=torch.float32)
    observations[:, 0] = first
    for t in range(length):
        actions[:, t] = act(observations[:, : t + 1], actions[:, :t])
        observation, reward, *_ = env.step(actions[:, t])
        observations[:, t + 1], rewards[:, t] = observation, reward
    return Episodes(observations, actions, rewards)
