"""MAML with a PPO outer step for reinforcement learning (algo=maml_ppo): ProMP's outer loop (Rothfuss et al. 2019) on MAMLRL's rollouts.

The meta-batch is sampled as MAMLRL samples it (tasks/rl.py, maml_rl.py): per task `rollouts` episodes with the
meta-policy, `inner_steps` policy-gradient steps on their GAE advantages, new episodes with the adapted policy.
Then, instead of one TRPO step, `epochs` Adam steps (algo.optimizer, lr 1e-3) on PPO's clipped surrogate of those
post-update episodes, each epoch adapting again from the meta-parameters as they are now, on the same pre-update
episodes, second order unless first_order:

    inner:  w_b = theta - inner_lr * grad_theta  -mean(pi_theta / pi_sampled * A_pre)       (ProMP's LVC objective)
    outer:  -mean(min(r * A_post, clip(r, 1 - clip, 1 + clip) * A_post)),  r = pi_{w_b} / pi_sampled'

where pi_sampled and pi_sampled' are the policies that sampled the pre- and post-update episodes. At the first
epoch the weights are those that sampled, every ratio is 1 and the outer gradient is MAMLRL's surrogate gradient
(first order exactly; second order with the LVC term in the inner step's Hessian); at the later epochs the ratios
importance-weight the same episodes to the moved weights, and the clip stops an episode step pulling further once
its ratio has left [1 - clip, 1 + clip] in the direction its advantage favours.

The reference is ProMP (jonasrothfuss/ProMP, meta_policy_search/meta_algos/pro_mp.py with its MAMLPPOOptimizer):
Adam with learning rate 1e-3, 5 full-batch epochs per meta-batch (num_ppo_steps), clip 0.2 (its point-mass script
0.3), the inner step re-run each epoch from the current weights on the same pre-update episodes with likelihood
ratios to their sampling policy. Where we differ: no inner KL penalty (ProMP adds init_inner_kl_penalty times the
KL between the pre-update policy and its sampling policy, a second regularizer of the inner step; its point-mass
script fixes it at 5e-4) and no clip annealing (its default anneal_factor 1 keeps it constant, as here). garage's
MAMLPPO (garage/torch/algos/maml_ppo.py) takes one Adam step of 1e-3 per meta-batch with clip 0.5: algo.epochs=1
algo.clip=0.5. The gradients of each epoch are averaged over DDP ranks (manual_backward); each epoch but the last
is clipped (gradient_clip_val) and stepped here, the last one by the base's outer step, so trainer.global_step and
the LR scheduler still count meta-batches. An epoch whose meta-gradient is not finite ends the epochs: the base
then skips that step and counts it, as for any learner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalight.algorithms.optimization.functional import Params, TaskOutcome, split_state
from metalight.algorithms.rl.maml_rl import MAMLRL
from metalight.algorithms.rl.policy_gradient import Rollouts, gaussian_log_prob
from metalight.algorithms.rl.ppo import EpochSteps, check_ppo_settings, clipped_losses, clipped_ratio

__all__ = ["MAMLPPO", "clipped_ratio"]


class MAMLPPO(EpochSteps, MAMLRL):
    """MAML-RL with ProMP's PPO outer step: `epochs` Adam steps on the clipped surrogate per meta-batch, re-adapting through the LVC inner step each epoch (algo=maml_ppo)."""

    likelihood_ratio_inner = True

    def __init__(self, model: nn.Module, clip: float = 0.2, epochs: int = 5, **options: Any) -> None:
        """clip: PPO's clip range; epochs: Adam steps per meta-batch; options: MAMLRL's (inner_lr, first_order, optimizer, ...)."""
        super().__init__(model, **options)
        check_ppo_settings(clip, epochs, options.get("optimizer"), "maml_ppo")
        self.clip, self.epochs = float(clip), epochs
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.last_clipped = 0.0

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam with ProMP's (and garage's MAMLPPO's) outer learning rate, 1e-3."""
        return torch.optim.Adam(params, lr=1e-3)

    def clipped_surrogate(self, params: Params, query: Rollouts, advantage: Tensor, sampled_log_prob: Tensor) -> Tensor:
        """Per-task PPO loss [B]: minus the mean of min(r * A, clip(r) * A), r = pi_params / pi_sampled on the query episodes."""
        mean, std = self.policy(params, query.observations)
        losses, self.last_clipped = clipped_losses(
            gaussian_log_prob(mean, std, query.actions), sampled_log_prob, advantage, query.mask, self.clip, self.task_kind.loss
        )
        return losses

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Sample the meta-batch, then `epochs` times: adapt from the current weights, backpropagate the clipped surrogate, and step (all epochs but the last)."""
        params, support, query, advantage, returns = self.sample_meta_batch(batch)
        sampled_log_prob = self.sampling_distribution(params, query)[0]
        n_tasks, first = self.batch_size_of(batch), None
        for epoch in range(self.epochs):
            if epoch:  # the weights moved: adapt again from them, on the same pre-update episodes
                params = self.adapt_on(self.per_task(split_state(self.model)[0], n_tasks), support, create_graph=not self.train_loop.first_order)
            losses = self.clipped_surrogate(params, query, advantage, sampled_log_prob)
            self.manual_backward(losses.mean())  # DDP averages each epoch's meta-gradient
            first = losses.detach() if first is None else first
            if epoch < self.epochs - 1 and not self.step_within_meta_batch():
                break
        return TaskOutcome(first, returns, {}, first.new_zeros(0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The meta-step, then the fraction of the last epoch's live query steps whose ratio the clip held (train/ppo_clipped)."""
        super().training_step(batch, batch_idx)
        self.log("train/ppo_clipped", self.last_clipped, on_step=True, on_epoch=False, batch_size=self.batch_size_of(batch))
