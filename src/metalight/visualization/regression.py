"""Regression tasks as pictures: fits before and after adaptation (Finn et al. 2017, Fig. 2), and the MSE per inner step (Fig. 3, Appendix Fig. 6)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from metalight.algorithms.base import EpisodicModule
from metalight.tasks.regression import FunctionTasks, RegressionDataModule
from metalight.visualization.charts import tensorboard_writer

log = logging.getLogger(__name__)


def adapted_fits(algorithm: EpisodicModule, tasks: FunctionTasks, task_ids: Sequence[int], grid: np.ndarray) -> dict[str, Tensor]:
    """Adapt fixed tasks on their support points exactly as evaluation does and predict on `grid` [G, 1] after every inner step.

    Returns support_x [T, K, 1], support_y [T, K, 1], truth [T, G, 1] and predictions [T, P, G, 1]
    (P = eval_inner_steps + 1, step 0 = before adaptation), on the CPU.
    """
    supports = [tasks.points(0, index) for index in task_ids]
    truth = np.stack([tasks.task(0, index)[0].function(grid) for index in task_ids])
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=algorithm.device)  # noqa: E731
    batch = {
        "support_x": as_tensor([x[: tasks.k_shot] for x, _ in supports]),
        "support_y": as_tensor([y[: tasks.k_shot] for _, y in supports]),
        "query_x": as_tensor(np.repeat(grid[None], len(task_ids), axis=0)),
        "query_y": as_tensor(truth),
    }
    outputs = algorithm.evaluate_tasks(batch, "val", list(task_ids), keep_logits=True).logits
    return {"support_x": batch["support_x"].cpu(), "support_y": batch["support_y"].cpu(), "truth": torch.as_tensor(truth), "predictions": outputs.detach().cpu()}


def plot_fits(fits: dict[str, Tensor], grid: np.ndarray, steps: Sequence[int] = (0, 1, 10), axes: Any = None) -> Any:
    """Draw each task's true curve, support points and predictions after `steps` inner steps on matplotlib axes (one per task); the figure."""
    import matplotlib.pyplot as plt  # only when drawing: training without figures never imports it

    n = len(fits["truth"])
    if axes is None:
        _, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
        axes = axes[0]
    last = fits["predictions"].shape[1] - 1
    shown = sorted({min(s, last) for s in steps})
    for t, ax in enumerate(axes):
        ax.plot(grid[:, 0], fits["truth"][t, :, 0], color="black", linewidth=2, label="ground truth")
        for s in shown:
            if last == 0:  # a learner without inner steps (algo=cnp): its one prediction
                label, style = "prediction", "-"
            else:
                label, style = ("before adaptation", "--") if s == 0 else (f"after {s} step{'s' if s > 1 else ''}", "-")
            ax.plot(grid[:, 0], fits["predictions"][t, s, :, 0], linestyle=style, label=label)
        ax.scatter(fits["support_x"][t, :, 0], fits["support_y"][t, :, 0], color="purple", marker="^", zorder=3, label="support points")
        ax.set_title(f"validation task {t}")
    axes[0].legend(fontsize="small")
    figure = axes[0].figure
    figure.tight_layout()
    return figure


def plot_mse_per_step(values: Sequence[float], ax: Any = None, label: str = "validation") -> Any:
    """The query MSE after 0, 1, ... inner steps (Finn et al. Fig. 3) on a matplotlib Axes; the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xlabel("inner gradient steps")
    ax.set_ylabel("query MSE")
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure


class RegressionFits(Callback):
    """At every validation, log the fits of the first `n_tasks` fixed validation tasks and the MSE per inner step to TensorBoard.

    `val_regression/fits`: for each task its true function, its support points and the predictions
    before adaptation and after `steps` inner steps (Finn et al. 2017, Fig. 2), adapted exactly as
    validation adapts them. `val_regression/mse_per_step`: val/mse after 0, 1, ... inner steps (Fig. 3).
    Rank 0 with a TensorBoardLogger only; nothing for tasks that are not regression.
    """

    def __init__(self, n_tasks: int = 3, steps: Sequence[int] = (0, 1, 10), grid_points: int = 200) -> None:
        self.n_tasks, self.steps, self.grid_points = n_tasks, tuple(steps), grid_points
        self.logged_to: str | None = None  # the event folder the figures went to

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adapt the fixed tasks once more for the picture and draw both figures (after val/* are logged)."""
        datamodule = trainer.datamodule
        writer = tensorboard_writer(trainer) if trainer.is_global_zero and not trainer.sanity_checking else None
        if writer is None or not isinstance(datamodule, RegressionDataModule):
            return
        import matplotlib

        matplotlib.use("Agg")  # figures for TensorBoard only, never a window
        import matplotlib.pyplot as plt

        tasks = datamodule.tasks("val")
        low, high = datamodule.x_range
        grid = np.linspace(low, high, self.grid_points, dtype=np.float64)[:, None]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the val/* scalars are logged at
        fits = adapted_fits(pl_module, tasks, range(min(self.n_tasks, datamodule.n_val_tasks)), grid)
        writer.add_figure("val_regression/fits", plot_fits(fits, grid, self.steps), global_step=step, close=True)
        logged = trainer.callback_metrics
        per_step = [float(logged[f"val/mse_step{k}"]) for k in range((pl_module.eval_steps or 0) + 1) if f"val/mse_step{k}" in logged]
        if per_step:
            writer.add_figure("val_regression/mse_per_step", plot_mse_per_step(per_step), global_step=step, close=True)
        plt.close("all")
        self.logged_to = writer.log_dir

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say where the figures are, once training is over."""
        if self.logged_to:
            log.info(
                "Regression figures (Finn et al. Figs. 2 and 3): TensorBoard's Images tab, val_regression/fits and val_regression/mse_per_step, "
                "in %s (tensorboard --logdir %s)", self.logged_to, self.logged_to,
            )
