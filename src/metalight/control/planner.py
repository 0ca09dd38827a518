"""The MPC planner of GrBAL (Nagabandi et al. 2019): random shooting or CEM through a learned model, batched.

Every control step scores `candidates` action sequences of `horizon` steps through the model and returns, per
environment, the first action of the best one. `plan` makes ONE dynamics call per horizon step over all
environments x candidates, so a control step costs `horizon` calls (CEM: `cem_iterations` x `horizon`); `plan_loop`
is the plain reference, one call per candidate per step on [E, 1, ...], drawing the same random numbers, so the two
agree up to float rounding (tests/test_planner.py; benchmarks/planner.py times them side by side).

Follows learning_to_adapt's MPCController (policies/mpc_controller.py: get_rs_action, get_cem_action) with these
differences, all in CEM (their GrBAL and MB-MPC run scripts plan by random shooting, use_cem=False):
* elites are each environment's `max(int(candidates * elite_fraction), 1)` best candidates. Theirs mark
  `(-returns).argsort() < num_elites`, i.e. the candidates whose indices are the ranks of candidates
  0..num_elites-1 rather than the best ones, and pool them over all environments into one mean and std;
* the candidates scored, refit and returned are the samples clipped into the action box. Theirs score the unclipped
  samples in the model, refit on the clipped ones and return the best unclipped first action;
* the first distribution is the box's centre and half-width per (step, action dimension): their mean 0 and std 1
  for the [-1, 1] box, which every GrBAL body has.
As theirs: std is the elites' population std, the mean moves by mean <- alpha * mean + (1 - alpha) * elite mean, and
the action returned is the first of the last iteration's best candidate, not the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metalight.errors import ConfigError

# (observations [E, C, O], actions [E, C, A]) -> next observations [E, C, O]; E environments, each with its own model
Dynamics = Callable[[Tensor, Tensor], Tensor]
# (observations [E, C, O], actions [E, C, A], next observations [E, C, O]) -> rewards [E, C]
Reward = Callable[[Tensor, Tensor, Tensor], Tensor]
# (observations [E, O], action sequences [E, C, H, A]) -> discounted returns [E, C]
Evaluate = Callable[[Tensor, Tensor], Tensor]

METHODS = ("random_shooting", "cem")


def _whole(value: object, minimum: int) -> bool:
    """Whether `value` is an int (not a bool) >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value: object) -> bool:
    """Whether `value` is a finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PlannerSettings:
    """How the MPC controller plans (data.planner); defaults are GrBAL's run_grbal.py (random shooting, 500 x 10)."""

    method: str = "random_shooting"
    candidates: int = 500
    horizon: int = 10
    cem_iterations: int = 5
    elite_fraction: float = 0.1
    cem_alpha: float = 0.1
    discount: float = 1.0
    action_low: float = -1.0
    action_high: float = 1.0

    def __post_init__(self) -> None:
        """Refuse a bad value with one line naming its data.planner key."""
        key = "data.planner."
        if self.method not in METHODS:
            raise ConfigError(f"{key}method={self.method!r} is not known: use random_shooting (GrBAL's) or cem.")
        if not _whole(self.candidates, 1):
            raise ConfigError(f"{key}candidates={self.candidates!r} must be a whole number >= 1 (action sequences scored per control step; GrBAL: 500).")
        if not _whole(self.horizon, 1):
            raise ConfigError(f"{key}horizon={self.horizon!r} must be a whole number >= 1 (model steps looked ahead; GrBAL: 10).")
        if not _whole(self.cem_iterations, 1):
            raise ConfigError(f"{key}cem_iterations={self.cem_iterations!r} must be a whole number >= 1 (CEM refits per control step; GrBAL: 5).")
        if not (_number(self.elite_fraction) and 0 < self.elite_fraction <= 1):
            raise ConfigError(f"{key}elite_fraction={self.elite_fraction!r} must be a number in (0, 1] (share of candidates CEM refits on; GrBAL: 0.1).")
        if not (_number(self.cem_alpha) and 0 <= self.cem_alpha <= 1):
            raise ConfigError(f"{key}cem_alpha={self.cem_alpha!r} must be a number in [0, 1] (weight CEM keeps on its previous mean; GrBAL: 0.1).")
        if not (_number(self.discount) and 0 < self.discount <= 1):
            raise ConfigError(f"{key}discount={self.discount!r} must be a number in (0, 1] (weight of reward t steps ahead: discount^t; GrBAL: 1).")
        for name in ("action_low", "action_high"):
            if not _number(getattr(self, name)):
                raise ConfigError(f"{key}{name}={getattr(self, name)!r} must be a finite number (the action box; GrBAL's bodies: [-1, 1]).")
        if self.action_low >= self.action_high:
            raise ConfigError(f"{key}action_low={self.action_low!r} must be below {key}action_high={self.action_high!r} (the action box, e.g. -1 and 1).")

    @property
    def elites(self) -> int:
        """Candidates CEM refits on, as theirs: max(int(candidates * elite_fraction), 1)."""
        return max(int(self.candidates * self.elite_fraction), 1)


@torch.no_grad()
def plan(settings: PlannerSettings, dynamics: Dynamics, reward: Reward, observations: Tensor, generator: torch.Generator, action_dim: int) -> Tensor:
    """Actions [E, action_dim] for observations [E, O]: one dynamics call per horizon step over all E x C candidates.

    No autograd graph is kept (planning never differentiates, even through adapted parameters that require grad).
    `generator` lives on observations' device; the candidates take observations' dtype.
    """
    return _PLANNERS[settings.method](settings, _batched(dynamics, reward, settings.discount), observations, generator, action_dim)


@torch.no_grad()
def plan_loop(settings: PlannerSettings, dynamics: Dynamics, reward: Reward, observations: Tensor, generator: torch.Generator, action_dim: int) -> Tensor:
    """`plan`'s reference: the same random numbers, one dynamics call per candidate per step on [E, 1, ...]."""
    return _PLANNERS[settings.method](settings, _looped(dynamics, reward, settings.discount), observations, generator, action_dim)


def _batched(dynamics: Dynamics, reward: Reward, discount: float) -> Evaluate:
    """Returns of action sequences [E, C, H, A] from observations [E, O], all candidates through each model call."""

    def evaluate(observations: Tensor, actions: Tensor) -> Tensor:
        state = observations.unsqueeze(1).expand(-1, actions.shape[1], -1)
        returns = observations.new_zeros(actions.shape[:2])
        for t in range(actions.shape[2]):
            action = actions[:, :, t]
            following = dynamics(state, action)
            if following.shape != state.shape:
                raise ValueError(f"dynamics returned next observations of shape {tuple(following.shape)}, expected {tuple(state.shape)} [E, C, O]")
            rewards = reward(state, action, following)
            if rewards.shape != returns.shape:
                raise ValueError(f"reward returned shape {tuple(rewards.shape)}, expected {tuple(returns.shape)} [E, C]")
            returns = returns + discount**t * rewards
            state = following
        return returns

    return evaluate


def _looped(dynamics: Dynamics, reward: Reward, discount: float) -> Evaluate:
    """The same returns, one candidate at a time."""
    one = _batched(dynamics, reward, discount)
    return lambda observations, actions: torch.cat([one(observations, actions[:, c : c + 1]) for c in range(actions.shape[1])], dim=1)


def _first_action_of_best(candidates: Tensor, returns: Tensor) -> Tensor:
    """Per environment, the first action [E, A] of the candidate [E, C, H, A] with the highest return [E, C]."""
    return candidates[torch.arange(len(candidates), device=candidates.device), returns.argmax(dim=1), 0]


def _random_shooting(settings: PlannerSettings, evaluate: Evaluate, observations: Tensor, generator: torch.Generator, action_dim: int) -> Tensor:
    """get_rs_action: candidates uniform in the action box, the best by sum_t discount^t r_t."""
    shape = (len(observations), settings.candidates, settings.horizon, action_dim)
    unit = torch.rand(shape, generator=generator, device=observations.device, dtype=observations.dtype)
    candidates = settings.action_low + (settings.action_high - settings.action_low) * unit
    return _first_action_of_best(candidates, evaluate(observations, candidates))


def _cem(settings: PlannerSettings, evaluate: Evaluate, observations: Tensor, generator: torch.Generator, action_dim: int) -> Tensor:
    """get_cem_action, per environment: sample, clip, score, refit a diagonal Gaussian on the elites (module docstring)."""
    low, high = settings.action_low, settings.action_high
    shape = (len(observations), settings.candidates, settings.horizon, action_dim)
    mean = observations.new_full((shape[0], 1, *shape[2:]), (low + high) / 2)
    std = observations.new_full(mean.shape, (high - low) / 2)
    for _ in range(settings.cem_iterations):
        noise = torch.randn(shape, generator=generator, device=observations.device, dtype=observations.dtype)
        candidates = (mean + noise * std).clamp(low, high)
        returns = evaluate(observations, candidates)
        best = returns.topk(settings.elites, dim=1).indices
        elites = candidates.gather(1, best[:, :, None, None].expand(-1, -1, *shape[2:]))
        mean = settings.cem_alpha * mean + (1 - settings.cem_alpha) * elites.mean(dim=1, keepdim=True)
        std = elites.std(dim=1, correction=0, keepdim=True)
    return _first_action_of_best(candidates, returns)


_PLANNERS = {"random_shooting": _random_shooting, "cem": _cem}
