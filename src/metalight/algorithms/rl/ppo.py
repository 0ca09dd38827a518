"""PPO's pieces that MAML-PPO and RL² share (Schulman et al. 2017): the clipped surrogate, its settings, and the Adam
steps of the epochs before a meta-batch's last.

A learner that takes `epochs` optimizer steps per meta-batch backpropagates each epoch's loss with manual_backward
(DDP averages it), steps all but the last epoch itself (step_within_meta_batch) and leaves the last one's gradient to
the base's outer step, so trainer.global_step and the LR scheduler still count meta-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metalight.errors import ConfigError
from metalight.algorithms.rl.trpo import TRPO


def clipped_ratio(ratio: Tensor, advantage: Tensor, clip: float) -> Tensor:
    """The ratio PPO's objective multiplies each advantage by: r, or clip(r, 1 - clip, 1 + clip) where that gives the smaller r * A.

    Times the advantage it is min(r * A, clip(r) * A) (Schulman et al. 2017, eq. 7); where the clipped value is taken
    the ratio is a constant (zero gradient): beyond 1 + clip for A > 0, below 1 - clip for A < 0.
    """
    bounded = ratio.clamp(1 - clip, 1 + clip)
    return torch.where(ratio * advantage <= bounded * advantage, ratio, bounded)


def clipped_losses(
    log_prob: Tensor, sampled_log_prob: Tensor, advantage: Tensor, mask: Tensor, clip: float, loss: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, float]:
    """Per-task PPO loss [B] (the task kind's loss of the clipped ratio pi / pi_sampled and the advantages, [B, ...]) and the
    fraction of live steps whose ratio the clip held."""
    ratio = (log_prob - sampled_log_prob).exp()
    effective = clipped_ratio(ratio, advantage, clip)
    live = mask.bool()
    clipped = float((effective.detach() != ratio.detach())[live].float().mean()) if live.any() else 0.0
    return torch.vmap(loss)(effective, advantage), clipped


def check_ppo_settings(clip: float, epochs: int, optimizer: object, algorithm: str) -> None:
    """ConfigError unless clip > 0, epochs a whole number >= 1 and the optimizer a first-order one (TRPO builds its trust region in algo=maml_rl only)."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise ConfigError(f"algo.clip={clip!r} is not valid: use a number > 0 (ProMP: 0.2, garage's MAMLPPO: 0.5, garage's RL2PPO: 0.2).")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"algo.epochs={epochs!r} is not valid: use a whole number >= 1 (ProMP: 5, garage's MAMLPPO: 1, garage's RL2PPO: 10).")
    factory = getattr(optimizer, "func", optimizer)  # Hydra's _partial_: a functools.partial of the class
    if isinstance(factory, type) and issubclass(factory, TRPO):
        raise ConfigError(f"algo={algorithm} steps with a first-order optimizer (algo.optimizer: Adam by default), not TRPO: use algo=maml_rl for MAML-TRPO.")


class EpochSteps:
    """Mixin of an EpisodicModule that takes several optimizer steps per meta-batch (MAML-PPO's and RL²'s epochs)."""

    def step_within_meta_batch(self) -> bool:
        """Clip and apply the gradient of an epoch before the last, then zero it; False (the gradient left for the base to skip) when it is not finite."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return False
        optimizer = self.optimizers()
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        # the torch optimizer itself: a LightningOptimizer step would count as a global step
        optimizer.optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True
