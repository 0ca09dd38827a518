"""TRPO's outer step (Schulman et al. 2015) as a torch optimizer: conjugate gradient on KL-Hessian-vector products, then a backtracking line search.

The learner leaves the meta-gradient of its surrogate loss in `.grad` (as for any outer optimizer, so
clipping and the non-finite check apply) and hands the optimizer a `TrustRegionProblem` for the step: the
mean KL between the new and the old policies (with its graph to the parameters) and a function that
re-evaluates (surrogate, KL) after the parameters moved. The step and its defaults are pytorch-maml-rl's
MAMLTRPO.step with Finn et al.'s settings: KL <= 0.01, 10 CG iterations, damping 1e-5, 15 line-search steps of ratio 0.8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from metalight.errors import ConfigError


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10, residual_tol: float = 1e-10) -> Tensor:
    """An approximate solution x of A x = b for a symmetric positive definite A given as x -> A x (`iterations` CG steps)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        z = matvec(p)
        alpha = rr / (p @ z)
        x = x + alpha * p
        r = r - alpha * z
        new_rr = r @ r
        if new_rr < residual_tol:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    return x


def fisher_vector_product(
    kl: Tensor, params: list[Tensor], damping: float, average: Callable[[Tensor], Tensor] = lambda tensor: tensor
) -> Callable[[Tensor], Tensor]:
    """v -> H v + damping v, H the Hessian of `kl` in the flattened `params` (at the old policy: the Fisher information), averaged over processes.

    Two backward passes per product (Pearlmutter's trick: the gradient of grad(kl) . v), never H itself.
    """
    with torch.enable_grad():
        kl_grad = torch.cat([g.flatten() for g in torch.autograd.grad(kl, params, create_graph=True, allow_unused=True, materialize_grads=True)])

    def product(vector: Tensor) -> Tensor:
        with torch.enable_grad():
            hessian_vector = torch.autograd.grad(kl_grad @ vector, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        return average(torch.cat([g.flatten() for g in hessian_vector])) + damping * vector

    return product


@dataclasses.dataclass
class TrustRegionProblem:
    """What one TRPO step needs besides the gradient: the surrogate's value, the KL (with its graph), re-evaluation, averaging over processes."""

    loss: Tensor  # the surrogate at the current parameters (detached), what the line search must improve on
    kl: Tensor  # mean KL(new || old policy), differentiable twice with respect to the parameters
    evaluate: Callable[[], tuple[Tensor, Tensor]]  # (surrogate, KL) at the parameters as they are now, without graph
    average: Callable[[Tensor], Tensor] = lambda tensor: tensor  # mean over DDP processes (identity on one)


class TRPO(torch.optim.Optimizer):
    """The trust-region outer step: direction F^-1 g by conjugate gradient, scaled to KL = max_kl, then backtracking until the surrogate improves within the KL bound.

    F v is the Hessian of the problem's KL times v (plus cg_damping v). The line search tries lr * ratio^k times
    the full step for k = 0..ls_max_steps-1 and keeps the parameters where they were when none is accepted.
    `last` holds the step's diagnostics (accepted fraction, KL, surrogate improvement) for logging.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        ls_max_steps: int = 15,
        ls_backtrack_ratio: float = 0.8,
        lr: float = 1.0,
    ) -> None:
        for name, value in (("max_kl", max_kl), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"algo.optimizer.{name}={value!r} is not valid: use a number > 0.")
        for name, value in (("cg_iters", cg_iters), ("ls_max_steps", ls_max_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"algo.optimizer.{name}={value!r} is not valid: use a whole number >= 1.")
        if not 0 < ls_backtrack_ratio < 1:
            raise ConfigError(f"algo.optimizer.ls_backtrack_ratio={ls_backtrack_ratio!r} is not valid: use a number in (0, 1), e.g. 0.8.")
        if cg_damping < 0:
            raise ConfigError(f"algo.optimizer.cg_damping={cg_damping!r} is not valid: use a number >= 0.")
        defaults = dict(lr=lr, max_kl=max_kl, cg_iters=cg_iters, cg_damping=cg_damping, ls_max_steps=ls_max_steps, ls_backtrack_ratio=ls_backtrack_ratio)
        super().__init__(params, defaults)
        self.problem: TrustRegionProblem | None = None
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> None:  # type: ignore[override]
        """One trust-region step from the gradients in .grad and the problem the learner set (consumed)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        problem, self.problem = self.problem, None
        if problem is None:
            raise RuntimeError("TRPO.step needs the learner's TrustRegionProblem for this step (set optimizer.problem first)")
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.requires_grad]
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        fisher_vector = fisher_vector_product(problem.kl, params, group["cg_damping"], problem.average)
        direction = conjugate_gradient(fisher_vector, grad, group["cg_iters"])
        shs = 0.5 * direction @ fisher_vector(direction)
        self.last = {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0}
        if not (torch.isfinite(shs) and shs > 0 and torch.isfinite(direction).all()):
            return  # a degenerate direction: no step (the learner's non-finite check sees a finite gradient, so say so here)
        full_step = direction / torch.sqrt(shs / group["max_kl"])
        old = torch.nn.utils.parameters_to_vector(params)
        fraction = group["lr"]
        for _ in range(group["ls_max_steps"]):
            torch.nn.utils.vector_to_parameters(old - fraction * full_step, params)
            loss, kl = problem.evaluate()
            improvement = problem.average(loss.detach()) - problem.loss
            kl = problem.average(kl.detach())
            if improvement < 0 and kl < group["max_kl"]:
                self.last = {"kl": float(kl), "improvement": float(improvement), "step_fraction": fraction}
                return
            fraction *= group["ls_backtrack_ratio"]
        torch.nn.utils.vector_to_parameters(old, params)
