"""Reptile as openai/supervised-reptile runs it, written with torch.optim on a module clone: the tests' reference.

One torch.optim.Adam(betas=(0, 0.999)) per process lives for the whole run: before each task only the
weights are reset to theta, the moments and step count carry on. With `shares` > 1 it plays the DDP
rule of metalight.algorithms.Reptile: each share of a meta-batch (a rank's tasks) carries the state
through its tasks in order, then the shares' moments are averaged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def adapt_task(clone: nn.Module, adam: torch.optim.Optimizer, theta: dict[str, Tensor], x: Tensor, y: Tensor, plan: Tensor) -> None:
    """Reset the clone's weights to theta and take one Adam step per row of `plan` (support indices)."""
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(theta[name])
    for chosen in plan:
        adam.zero_grad()
        F.cross_entropy(clone(x[chosen]), y[chosen]).backward()
        adam.step()


def average_adam_states(states: list[dict]) -> dict:
    """The moments of several Adam state dicts (same parameters, same step count) averaged."""
    merged = copy.deepcopy(states[0])
    for key, slot in merged["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            slot[moment] = torch.stack([s["state"][key][moment] for s in states]).mean(dim=0)
    return merged


def reference_reptile(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    plans: Callable[[int, int], Tensor],
    lr: float,
    eps: Callable[[int], float],
    shares: int = 1,
) -> tuple[dict[str, Tensor], dict]:
    """theta after the meta-steps on `batches` (plans(step, task) -> minibatch indices [steps, batch]) and the Adam state dict."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    clone = copy.deepcopy(model)
    state = None
    for step, batch in enumerate(batches):
        n_tasks = batch["support_x"].shape[0]
        per_share = n_tasks // shares
        phis, states = [], []
        for share in range(shares):
            adam = torch.optim.Adam(clone.parameters(), lr=lr, betas=(0.0, 0.999))
            if state is not None:
                adam.load_state_dict(copy.deepcopy(state))  # load_state_dict keeps the tensors: Adam would update `state` in place
            for task in range(share * per_share, (share + 1) * per_share):
                adapt_task(clone, adam, theta, batch["support_x"][task], batch["support_y"][task], plans(step, task))
                phis.append({k: v.detach().clone() for k, v in clone.named_parameters()})
            states.append(copy.deepcopy(adam.state_dict()))
        state = average_adam_states(states)
        theta = {k: theta[k] + eps(step) * (torch.stack([phi[k] for phi in phis]).mean(dim=0) - theta[k]) for k in theta}
    return theta, state
