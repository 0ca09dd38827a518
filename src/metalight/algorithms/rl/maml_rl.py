"""MAML for reinforcement learning (Finn et al. 2017, §5.3): an inner vanilla policy gradient per task, a TRPO outer step through it.

A meta-batch holds task parameters (goals); the learner rolls out itself, all tasks and all rollouts in
one vector environment (tasks/rl.py). Per task: `rollouts` episodes with the meta-policy, advantages from
GAE on a linear feature baseline fitted to them, `inner_steps` VPG steps of `inner_lr` on REINFORCE's
surrogate (the adapted weights keep their graph to the meta-parameters: second order unless first_order),
new episodes with the adapted policy, and on those the outer surrogate -mean(pi/pi_old * advantage). Its
meta-gradient is left in .grad; the outer optimizer (algo.optimizer: TRPO by default, as pytorch-maml-rl's
MAMLTRPO, or any torch optimizer) takes the step, with the mean KL between the adapted policies before
and after it as TRPO's trust region. The adapted weights are per task: every policy call is
`torch.func.vmap` over tasks of `functional_call`, and since task b's surrogate depends on its own slice
of the weights only, one autograd call on the sum of the tasks' surrogates gives every task's inner gradient.

Validation and test score each fixed task's return with the meta-policy (step 0), then after each of
`eval_inner_steps` VPG steps (Finn et al. Fig. 5: 0-3), the first of `eval_inner_lr`, the others of
`eval_inner_lr_later` (the authors halve it). inner_steps=0 is the
"pretrained" baseline (one policy trained on all tasks, fine-tuned at test); trainer.max_steps=0 the
"random" one (the untrained policy fine-tuned).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.base import EpisodicModule, OptimizerFactory, SchedulerFactory
from metalight.algorithms.optimization.functional import InnerLoop, Params, TaskOutcome, split_state
from metalight.algorithms.rl.policy_gradient import Rollouts, advantages, check_discounts, gaussian_kl, gaussian_log_prob, sample_rollouts
from metalight.algorithms.rl.trpo import TRPO, TrustRegionProblem
from metalight.errors import ConfigError
from metalight.tasks.kinds import TaskKind
from metalight.tasks.rl import TaskEnvironment


class MAMLRL(EpisodicModule):
    """MAML-TRPO (second order unless first_order) with a VPG inner loop on rollouts it samples itself (algo=maml_rl)."""

    task_kinds = ("reinforcement",)
    # the inner surrogate while meta-training: REINFORCE's log-likelihood (Finn et al., pytorch-maml-rl), or the
    # likelihood ratio to the policy that sampled the support rollouts (ProMP's LVC; MAMLPPO)
    likelihood_ratio_inner = False

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        eval_inner_lr: float | None = None,
        eval_inner_lr_later: float | None = None,
        first_order: bool = False,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        baseline_reg: float = 1e-5,
        normalize_advantages: bool = True,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, optimizer, scheduler, gradient_clip_val, "vmap", max_nonfinite_steps)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        check_discounts(gamma, gae_lambda)
        self.train_loop = InnerLoop(steps=inner_steps, lr=inner_lr, first_order=first_order)
        self.eval_loop = InnerLoop(steps=eval_inner_steps, lr=inner_lr if eval_inner_lr is None else eval_inner_lr)
        # evaluation steps after the first (Finn et al., A.2: "halving the learning rate after the first gradient step")
        self.eval_lr_later = self.eval_loop.lr if eval_inner_lr_later is None else InnerLoop(steps=0, lr=eval_inner_lr_later).lr
        self.gamma, self.gae_lambda, self.baseline_reg, self.normalize_advantages = gamma, gae_lambda, baseline_reg, normalize_advantages
        self.environment: TaskEnvironment | None = None

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """TRPO with Finn et al.'s settings (KL <= 0.01)."""
        return TRPO(params)

    def use_task_kind(self, kind: TaskKind) -> None:
        """Take the RL tasks' environment, checking that the policy reads its observations and outputs (mean, std) of its actions."""
        super().use_task_kind(kind)
        environment = getattr(kind, "environment", None)
        if environment is None:
            raise ConfigError("algo=maml_rl needs tasks with an environment: use data=navigation2d.")
        weight = next(self.model.parameters(), None)
        probe = torch.zeros(1, environment.observation_dim, device=self.device, dtype=weight.dtype if weight is not None else None)
        try:
            with torch.no_grad():
                output = self.model(probe)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the policy ({type(self.model).__name__}) cannot act in data.env={environment.name}, whose observations have "
                f"{environment.observation_dim} numbers ({str(error).splitlines()[0]}): set model.in_features={environment.observation_dim}, or use model=gaussian_mlp."
            ) from None
        if not (isinstance(output, tuple) and len(output) == 2):
            raise ConfigError(f"algo=maml_rl needs a Gaussian policy returning (mean, std), but {type(self.model).__name__} does not: use model=gaussian_mlp.")
        mean, std = output
        if mean.shape[-1] != environment.action_dim or std.shape[-1] != environment.action_dim:
            raise ConfigError(
                f"the policy outputs {mean.shape[-1]} action dimensions but data.env={environment.name} takes {environment.action_dim}: "
                f"set model.out_features={environment.action_dim}."
            )
        self.environment = environment

    def batch_size_of(self, batch: dict[str, Tensor]) -> int:
        """Tasks in a meta-batch."""
        return batch["tasks"].shape[0]

    def tasks_in(self, batch: dict[str, Tensor]) -> int:
        """Tasks in an evaluation batch."""
        return batch["tasks"].shape[0]

    # ---- the policy and its rollouts -------------------------------------------------------------
    def policy(self, params: Params, observations: Tensor) -> tuple[Tensor, Tensor]:
        """Each task's policy (weights [B, ...]) at its observations [B, ...]: mean [B, ..., A] and std broadcastable to it."""
        mean, std = torch.func.vmap(lambda p, o: functional_call(self.model, p, (o,)))(params, observations)
        return mean, std.view(std.shape[0], *[1] * (mean.dim() - 2), std.shape[-1])

    def rollouts(self, params: Params, batch: dict[str, Tensor], phase: int, rollouts: int) -> Rollouts:
        """Episodes of every task under its policy (no gradient), its noise fixed by the task's seed and `phase`."""
        frozen = {k: v.detach() for k, v in params.items()}
        return sample_rollouts(self.environment, lambda o: self.policy(frozen, o), batch["tasks"], batch["seeds"], phase, rollouts)

    def advantages(self, rollouts: Rollouts) -> Tensor:
        """Normalized GAE advantages [B, R, T] on the per-task linear baseline."""
        return advantages(rollouts, self.gamma, self.gae_lambda, self.baseline_reg, self.normalize_advantages)

    def inner_step(
        self, params: Params, rollouts: Rollouts, advantage: Tensor, lr: float, create_graph: bool, sampled_log_prob: Tensor | None = None
    ) -> Params:
        """One VPG step per task: w_b - lr * grad of task b's REINFORCE surrogate (the gradient differentiable in the weights when create_graph).

        sampled_log_prob: the actions' log-likelihoods [B, R, T] under the policy that sampled them; given, the
        surrogate takes the likelihood ratio pi / pi_sampled in place of log pi (ProMP's LVC objective, algo=maml_ppo):
        the same gradient at the sampling policy, importance-weighted away from it, and its Hessian keeps the score's
        outer product that the log-likelihood's drops.
        """
        # first order: the gradient is taken at a detached copy (a constant), the step stays differentiable in the weights
        at = params if create_graph else {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            mean, std = self.policy(at, rollouts.observations)
            log_prob = gaussian_log_prob(mean, std, rollouts.actions)
            objective = log_prob if sampled_log_prob is None else (log_prob - sampled_log_prob).exp()
            losses = torch.vmap(self.task_kind.loss)(objective, advantage)
            grads = torch.autograd.grad(losses.sum(), tuple(at.values()), create_graph=create_graph)
        return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}

    def per_task(self, params: Params, n_tasks: int) -> Params:
        """The meta-parameters repeated for each task ([B, ...] views: gradients sum back into them)."""
        return {k: v.unsqueeze(0).expand(n_tasks, *v.shape) for k, v in params.items()}

    def score(self, rollouts: Rollouts) -> Tensor:
        """Each task's average return [B]."""
        return torch.vmap(self.task_kind.score)(rollouts.rewards, rollouts.mask)

    # ---- meta-training ---------------------------------------------------------------------------
    def adapt_on(self, params: Params, support: list[tuple[Tensor, ...]], create_graph: bool) -> Params:
        """The weights after one VPG step on each of the given (rollouts, advantages[, log-likelihoods under the sampling policy]), in order."""
        for rollouts, advantage, *sampled_log_prob in support:
            params = self.inner_step(params, rollouts, advantage, self.train_loop.lr, create_graph, *sampled_log_prob)
        return params

    def sampling_distribution(self, params: Params, rollouts: Rollouts) -> tuple[Tensor, Tensor, Tensor]:
        """(log-likelihoods of the actions [B, R, T], mean, std) under the policies `params`, without gradient: pi_old of the ratios."""
        with torch.no_grad():
            mean, std = self.policy(params, rollouts.observations)
            return gaussian_log_prob(mean, std, rollouts.actions), mean, std

    def sample_meta_batch(self, batch: dict[str, Tensor]) -> tuple[Params, list[tuple[Tensor, ...]], Rollouts, Tensor, Tensor]:
        """Roll out, adapt, roll out again: the adapted weights (their graph to the meta-parameters second order unless
        first_order), the support [(rollouts, advantages[, their sampling log-likelihoods when likelihood_ratio_inner])]
        per inner step, the query rollouts and advantages, and each task's return before and after each step [B, steps + 1]."""
        theta, _ = split_state(self.model)
        loop = self.train_loop
        params, support, returns = self.per_task(theta, self.batch_size_of(batch)), [], []
        for step in range(loop.steps):
            rollouts = self.rollouts(params, batch, step, self.environment.rollouts)
            sampled = (self.sampling_distribution(params, rollouts)[0],) if self.likelihood_ratio_inner else ()
            support.append((rollouts, self.advantages(rollouts), *sampled))
            returns.append(self.score(rollouts))
            params = self.adapt_on(params, support[-1:], create_graph=not loop.first_order)
        query = self.rollouts(params, batch, loop.steps, self.environment.rollouts)
        returns.append(self.score(query))
        return params, support, query, self.advantages(query), torch.stack(returns, 1)

    def surrogate(self, params: Params, query: Rollouts, advantage: Tensor, old: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-task outer surrogate -mean(pi/pi_old * A) [B] and mean KL(pi || pi_old) over live steps [B], old = (log-probs, mean, std)."""
        mean, std = self.policy(params, query.observations)
        ratio = (gaussian_log_prob(mean, std, query.actions) - old[0]).exp()
        losses = torch.vmap(self.task_kind.loss)(ratio, advantage)
        kl = (gaussian_kl(mean, std, old[1], old[2]) * query.mask).flatten(1).sum(1) / query.mask.flatten(1).sum(1).clamp(min=1)
        return losses, kl

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Roll out, adapt, roll out again, leave the surrogate's meta-gradient in .grad and hand TRPO its trust-region problem."""
        params, support, query, query_advantage, returns = self.sample_meta_batch(batch)
        n_tasks = self.batch_size_of(batch)
        old = self.sampling_distribution(params, query)
        losses, kl = self.surrogate(params, query, query_advantage, old)
        loss = losses.mean()
        self.manual_backward(loss, retain_graph=True)  # TRPO differentiates the KL, which shares this graph

        optimizer = self.optimizers().optimizer if self._trainer is not None else None
        if isinstance(optimizer, TRPO):

            def evaluate() -> tuple[Tensor, Tensor]:
                adapted = self.adapt_on(self.per_task(split_state(self.model)[0], n_tasks), support, create_graph=False)
                with torch.no_grad():
                    losses, kl = self.surrogate(adapted, query, query_advantage, old)
                return losses.mean(), kl.mean()

            average = lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="mean")  # noqa: E731
            optimizer.problem = TrustRegionProblem(average(loss.detach()), kl.mean(), evaluate, average)
        return TaskOutcome(losses.detach(), returns, {}, losses.new_zeros(0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The base meta-step, then TRPO's diagnostics (KL of the step, accepted fraction of the full step)."""
        super().training_step(batch, batch_idx)
        optimizer = self.optimizers().optimizer
        if isinstance(optimizer, TRPO) and optimizer.last:
            self.log_dict({f"train/trpo_{k}": v for k, v in optimizer.last.items()}, on_step=True, on_epoch=False, batch_size=self.batch_size_of(batch))

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Each task's return before adaptation and after each of eval_inner_steps VPG steps (eval_inner_lr, then eval_inner_lr_later), scores [B, steps + 1]; loss: minus the last return.

        keep_logits: also return the episodes' observations after every step, [B, steps + 1, R, T, O] (the
        trajectories the navigation figure draws).
        """
        theta = {k: v.detach() for k, v in split_state(self.model)[0].items()}
        loop, n_tasks = self.eval_loop, self.tasks_in(batch)
        params, scores, observations = self.per_task(theta, n_tasks), [], []
        for step in range(loop.steps + 1):
            rollouts = self.rollouts(params, batch, step, self.environment.eval_rollouts)
            scores.append(self.score(rollouts))
            if keep_logits:
                observations.append(rollouts.observations)
            if step < loop.steps:
                lr = loop.lr if step == 0 else self.eval_lr_later
                params = {k: v.detach() for k, v in self.inner_step(params, rollouts, self.advantages(rollouts), lr, create_graph=False).items()}
        returns = torch.stack(scores, 1)
        return TaskOutcome(-returns[:, -1], returns, {}, torch.stack(observations, 1) if keep_logits else returns.new_zeros(0))
