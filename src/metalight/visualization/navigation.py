"""2-D navigation as pictures (Finn et al. 2017, Fig. 5, left): trajectories of fixed goals before and after adaptation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from metalight.algorithms.base import EpisodicModule
from metalight.tasks.rl import RLDataModule
from metalight.visualization.charts import tensorboard_writer

log = logging.getLogger(__name__)


def adapted_trajectories(algorithm: EpisodicModule, datamodule: RLDataModule, task_ids: Sequence[int], part: str = "val") -> dict[str, Tensor]:
    """Adapt fixed tasks exactly as evaluation does and keep their episodes: goals [T, 2], observations [T, P, R, H, 2], returns [T, P] (CPU),
    and what P counts, "within_trial": the episodes of a trial (RL²) rather than inner steps."""
    batch = datamodule.tasks(part)[[(0, i) for i in task_ids]]
    batch = {k: v.to(algorithm.device) for k, v in batch.items()}
    outcome = algorithm.evaluate_tasks(batch, part, list(task_ids), keep_logits=True)
    return {
        "goals": batch["tasks"].cpu(), "observations": outcome.logits.detach().cpu(), "returns": outcome.scores.detach().cpu(),
        "within_trial": getattr(algorithm, "adapts_within_trial", False),
    }


def plot_trajectories(trajectories: dict[str, Tensor], steps: Sequence[int] = (0, 1, 3), rollouts: int = 1, axes: Any = None) -> Any:
    """Draw, for each task, the goal and the first `rollouts` episodes before adaptation and after `steps` inner steps (for RL²: episodes
    steps + 1 of a trial); the figure."""
    import matplotlib.pyplot as plt  # only when drawing

    goals, observations, returns = trajectories["goals"], trajectories["observations"], trajectories["returns"]
    n = len(goals)
    if axes is None:
        _, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
        axes = axes[0]
    last = observations.shape[1] - 1
    for t, ax in enumerate(axes):
        for s in sorted({min(s, last) for s in steps}):
            if trajectories.get("within_trial", False):
                label = f"episode {s + 1}"
            else:
                label = "pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}"
            for r in range(min(rollouts, observations.shape[2])):
                path = torch.cat([torch.zeros(1, 2), observations[t, s, r]])
                ax.plot(path[:, 0], path[:, 1], linestyle="--" if s == 0 else "-", label=f"{label} ({float(returns[t, s]):.1f})" if r == 0 else None)
        ax.scatter([float(goals[t, 0])], [float(goals[t, 1])], marker="*", s=150, color="black", zorder=3, label="goal")
        ax.scatter([0.0], [0.0], marker="o", color="grey", zorder=3)
        ax.set_xlim(-0.6, 0.6), ax.set_ylim(-0.6, 0.6), ax.set_aspect("equal")
        ax.set_title(f"validation goal {t}")
        ax.legend(fontsize="x-small", title="average return", title_fontsize="x-small")
    figure = axes[0].figure
    figure.tight_layout()
    return figure


class NavigationTrajectories(Callback):
    """At every validation, log `val_navigation/trajectories`: the first `n_tasks` fixed validation goals with an episode before adaptation and after `steps` inner steps.

    Adapted exactly as validation adapts them (the same noise), with each step's average return in the legend
    (Finn et al. 2017, Fig. 5, left). Rank 0 with a TensorBoardLogger only; nothing for other tasks.
    """

    def __init__(self, n_tasks: int = 3, steps: Sequence[int] = (0, 1, 3)) -> None:
        self.n_tasks, self.steps = n_tasks, tuple(steps)
        self.logged_to: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adapt the fixed goals once more for the picture and draw it."""
        datamodule = trainer.datamodule
        writer = tensorboard_writer(trainer) if trainer.is_global_zero and not trainer.sanity_checking else None
        if writer is None or not isinstance(datamodule, RLDataModule) or datamodule.env != "navigation2d":
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trajectories = adapted_trajectories(pl_module, datamodule, range(min(self.n_tasks, datamodule.n_val_tasks)))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        writer.add_figure("val_navigation/trajectories", plot_trajectories(trajectories, self.steps), global_step=step, close=True)
        plt.close("all")
        self.logged_to = writer.log_dir

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say where the figure is, once training is over."""
        if self.logged_to:
            log.info("Navigation trajectories (Finn et al. Fig. 5): TensorBoard's Images tab, val_navigation/trajectories, in %s", self.logged_to)
