"""TRPO's outer step (algorithms/rl/trpo.py) and the Gaussian policy's log-likelihood and KL (algorithms/rl/policy_gradient.py), on a tiny policy in float64.

References: torch.distributions for the Gaussian, an explicit Fisher (the policy's Jacobians, and the exact
Hessian of the KL) for the Fisher-vector product, and a step computed here from that explicit matrix for the
trust region.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence
from torch.func import functional_call, jacrev

from metalight.algorithms.rl.policy_gradient import gaussian_kl, gaussian_log_prob
from metalight.algorithms.rl.trpo import TRPO, TrustRegionProblem, fisher_vector_product
from metalight.models import GaussianMLP


def test_gaussian_log_prob_and_kl_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, old_mean, actions = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    # std as the learner passes it: one per action dimension, broadcast over tasks and steps
    std, old_std = (torch.rand(1, 1, 2, generator=g, dtype=torch.float64) + 0.2 for _ in range(2))
    ours = gaussian_log_prob(mean, std, actions)
    theirs = Independent(Normal(mean, std.expand_as(mean)), 1).log_prob(actions)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # KL(new || old), the direction the learner constrains
    kl = gaussian_kl(mean, std, old_mean, old_std)
    reference = kl_divergence(Independent(Normal(mean, std.expand_as(mean)), 1), Independent(Normal(old_mean, old_std.expand_as(old_mean)), 1))
    torch.testing.assert_close(kl, reference, rtol=1e-12, atol=1e-12)
    assert kl.shape == (3, 4) and bool((kl > 0).all())


def tiny_policy(hidden: tuple[int, ...] = (3,)) -> GaussianMLP:
    torch.manual_seed(0)
    policy = GaussianMLP(3, 2, hidden=hidden, activation="tanh").double()
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.3, 0.2]))  # two different stds: a Fisher that is not a multiple of the identity
    return policy


def episodes(policy: GaussianMLP, n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations, actions sampled from the policy, and advantages that favour wider actions shifted along the first axis."""
    g = torch.Generator().manual_seed(1)
    observations = torch.randn(n, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mean, std = policy(observations)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    actions = mean + std * noise
    # a wider std: the KL grows faster than its quadratic model along the log-std, so a large full step breaks the bound
    advantages = 0.5 * noise[:, 0] + (noise**2).sum(-1) - 2
    return observations, actions, advantages


def trust_region_problem(policy: GaussianMLP, observations: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor) -> TrustRegionProblem:
    """The learner's contract: the surrogate -mean(pi / pi_old * A)'s gradient in .grad, its value, the mean KL(pi || pi_old) with its graph, re-evaluation."""
    with torch.no_grad():
        old_mean, old_std = policy(observations)
        old_log_prob = gaussian_log_prob(old_mean, old_std, actions)

    def surrogate_and_kl() -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = policy(observations)
        ratio = (gaussian_log_prob(mean, std, actions) - old_log_prob).exp()
        return -(ratio * advantages).mean(), gaussian_kl(mean, std, old_mean, old_std).mean()

    policy.zero_grad()
    loss, kl = surrogate_and_kl()
    loss.backward(retain_graph=True)

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return surrogate_and_kl()

    return TrustRegionProblem(loss.detach(), kl, evaluate)


def flat(policy: GaussianMLP) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(policy.parameters()).detach().clone()


def explicit_fisher(policy: GaussianMLP, observations: torch.Tensor) -> torch.Tensor:
    """The Gaussian policy's Fisher information, mean over observations: J_mean^T diag(1 / std^2) J_mean, plus 2 on each log-std (no cross terms)."""
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]
    sizes = [p.numel() for p in policy.parameters()]

    def mean_of(vector: torch.Tensor) -> torch.Tensor:
        params = {n: v.view(s) for n, v, s in zip(names, vector.split(sizes), shapes)}
        return functional_call(policy, params, (observations,))[0]

    jacobian = jacrev(mean_of)(flat(policy))  # [N, 2, P]
    std = policy.log_std.detach().exp()
    fisher = torch.einsum("nap,a,naq->pq", jacobian, std**-2, jacobian) / len(observations)
    start = sum(sizes[: names.index("log_std")])
    fisher[start : start + 2, start : start + 2] += 2 * torch.eye(2, dtype=fisher.dtype)
    return fisher


def test_fisher_vector_product_is_the_explicit_fisher_and_the_exact_hessian_of_the_kl() -> None:
    policy = tiny_policy()
    observations, actions, advantages = episodes(policy)
    problem = trust_region_problem(policy, observations, actions, advantages)
    params = list(policy.parameters())
    product = fisher_vector_product(problem.kl, params, damping=0.1)

    fisher = explicit_fisher(policy, observations)
    with torch.no_grad():
        old_mean, old_std = policy(observations)
    names, shapes, sizes = [n for n, _ in policy.named_parameters()], [p.shape for p in params], [p.numel() for p in params]

    def kl_at(vector: torch.Tensor) -> torch.Tensor:
        mean, std = functional_call(policy, {n: v.view(s) for n, v, s in zip(names, vector.split(sizes), shapes)}, (observations,))
        return gaussian_kl(mean, std, old_mean, old_std).mean()

    hessian = torch.autograd.functional.hessian(kl_at, flat(policy))
    torch.testing.assert_close(hessian, fisher, rtol=1e-9, atol=1e-12)  # at the old policy the KL's Hessian is the Fisher
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        vector = torch.randn(len(fisher), generator=g, dtype=torch.float64)
        torch.testing.assert_close(product(vector), fisher @ vector + 0.1 * vector, rtol=1e-9, atol=1e-12)


def explicit_full_step(policy: GaussianMLP, observations: torch.Tensor, max_kl: float) -> torch.Tensor:
    """TRPO's full step from the explicit Fisher: -F^-1 g scaled so that its quadratic KL 0.5 s^T F s is max_kl."""
    fisher = explicit_fisher(policy, observations)
    grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    direction = torch.linalg.solve(fisher, grad)
    return -direction * torch.sqrt(2 * max_kl / (direction @ fisher @ direction))


def test_an_accepted_step_keeps_the_kl_within_max_kl_where_the_full_step_would_not() -> None:
    policy = tiny_policy(hidden=())  # a linear policy: 10 parameters, which 10 CG iterations solve exactly
    observations, actions, advantages = episodes(policy)
    max_kl = 0.5  # a large trust region, where the KL's quadratic model underestimates it
    problem = trust_region_problem(policy, observations, actions, advantages)
    before = flat(policy)
    full_step = explicit_full_step(policy, observations, max_kl)
    # the test's premise: the full step improves the surrogate but breaks the KL bound, so the line search must shrink it
    torch.nn.utils.vector_to_parameters(before + full_step, policy.parameters())
    loss, kl = problem.evaluate()
    assert loss < problem.loss and kl > max_kl, (float(loss), float(problem.loss), float(kl))
    torch.nn.utils.vector_to_parameters(before, policy.parameters())

    optimizer = TRPO(policy.parameters(), max_kl=max_kl, cg_damping=0.0)
    optimizer.problem = problem
    optimizer.step()
    moved = flat(policy) - before
    fraction = optimizer.last["step_fraction"]
    assert 0 < fraction < 1
    torch.testing.assert_close(moved, fraction * full_step, rtol=1e-6, atol=1e-9)  # the step is TRPO's, shrunk
    loss, kl = problem.evaluate()
    assert kl <= max_kl and loss < problem.loss
    assert optimizer.last["kl"] == pytest.approx(float(kl)) and optimizer.last["improvement"] == pytest.approx(float(loss - problem.loss))
    # the line search keeps the first acceptable fraction: the one before it broke the bound
    torch.nn.utils.vector_to_parameters(before + fraction / optimizer.defaults["ls_backtrack_ratio"] * full_step, policy.parameters())
    assert problem.evaluate()[1] > max_kl


def test_a_rejected_line_search_restores_the_parameters() -> None:
    policy = tiny_policy()
    observations, actions, advantages = episodes(policy)
    problem = trust_region_problem(policy, observations, actions, advantages)
    for p in policy.parameters():
        p.grad.neg_()  # a gradient pointing uphill: every fraction of the step worsens the surrogate
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = TRPO(policy.parameters(), ls_max_steps=3)
    optimizer.problem = problem
    optimizer.step()
    assert optimizer.last == {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0}
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before)), "the parameters are where they were"
    assert optimizer.problem is None, "the problem is consumed"
