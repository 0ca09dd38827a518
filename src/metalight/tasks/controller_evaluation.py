"""How well the model-based controller does on bodies it never trained on (data=grbal_*): returns with and without
online adaptation, the model's prediction error over an episode, and the learning curve of the collected episodes.

At every validation: `data.val_episodes` episodes on held-out bodies with the controller as configured (adapted
online unless data.adapt_online=false): val/return and val/return_ci95 (the checkpoint monitor). At the test:
`data.test_episodes` held-out bodies, each run twice with the same start and planner noise, adapted and not:
test/return, test/return_unadapted, test/adaptation_gain (their paired difference) and test/return_random (uniform
actions on the same bodies and starts) with 95% intervals, printed on one line; the one-step prediction error of the model before and after adapting to the last M transitions, at every
step of the adapted episodes (test/model_error_adapted, test/model_error_unadapted, and the curve over the
episode in TensorBoard's Images tab, test_dynamics/model_error). After each collection: train/collected_return, the
mean return of that iteration's episodes on training bodies (learning_to_adapt's AverageReturn).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from metalight.control.mpc import Episodes
from metalight.tasks.dynamics import CONTROLLER, SPLIT_CODES, DynamicsDataModule

log = logging.getLogger(__name__)


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std / sqrt(n) (sample std) of a 1-D tensor."""
    n = len(values)
    std = float(values.double().std()) if n > 1 else 0.0
    return float(values.double().mean()), 1.96 * std / math.sqrt(n)


def prediction_errors(datamodule: DynamicsDataModule, episodes: Episodes) -> dict[str, Tensor]:
    """One-step prediction error (MSE in the model's units) [E, T - M] of each step t >= M of the episodes, with the
    meta-weights ("unadapted") and with the weights adapted to transitions t-M..t-1 ("adapted")."""
    model, past = datamodule.learned_model(adapt=True), datamodule.past
    weight = next(iter(model.weights.values()))
    observations, actions = (episodes.observations.to(weight), episodes.actions.to(weight))
    n, steps = actions.shape[0], actions.shape[1]
    errors: dict[str, list[Tensor]] = {"unadapted": [], "adapted": []}
    meta = model.expanded(n)
    for t in range(past, steps):
        seen_obs, seen_act = observations[:, : t + 1], actions[:, :t]
        x = torch.cat([observations[:, t], actions[:, t]], -1).unsqueeze(1)
        target = model.normalized_delta(observations[:, t], observations[:, t + 1]).unsqueeze(1)
        for name, weights in (("unadapted", meta), ("adapted", model.weights_for(seen_obs, seen_act, past))):
            with torch.no_grad():
                errors[name].append((model.predict(weights, x) - target).pow(2).mean((1, 2)).cpu())
    return {name: torch.stack(values, 1) for name, values in errors.items()}


def plot_model_error(errors: dict[str, Tensor], past: int) -> Any:
    """The mean one-step prediction error over an episode, adapted vs not (a matplotlib figure)."""
    import matplotlib.pyplot as plt  # the caller's backend: a notebook shows the figure

    figure, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in errors.items():
        steps = range(past, past + values.shape[1])
        ax.plot(steps, values.mean(0).numpy(), label=f"{name} (mean {float(values.mean()):.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("step of the episode")
    ax.set_ylabel("one-step prediction error (MSE, normalized)")
    ax.set_title("Dynamics model on held-out bodies")
    ax.legend()
    figure.tight_layout()
    return figure


class ControllerEvaluation(Callback):
    """Scores the MPC controller on held-out bodies at validation and test (see the module docstring); nothing for other data."""

    def __init__(self) -> None:
        self._test: dict[str, Any] = {}

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> DynamicsDataModule | None:
        datamodule = trainer.datamodule
        return datamodule if isinstance(datamodule, DynamicsDataModule) else None

    def returns(self, datamodule: DynamicsDataModule, split: str, count: int, adapt: bool) -> Episodes:
        """Episodes on held-out bodies 0..count-1 of `split`, the planner's noise fixed per split (the same with and without adaptation)."""
        act = datamodule.controller(adapt, datamodule.eval_seed, CONTROLLER, SPLIT_CODES[split])
        return datamodule.episodes(split, 0, count, act)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the mean return of this iteration's collected episodes (the learning curve on training bodies)."""
        datamodule = self._datamodule(trainer)
        if datamodule is not None and datamodule.collected_returns:
            pl_module.log("train/collected_return", datamodule.collected_returns[-1], on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """val/return and val/return_ci95 of the controller as configured."""
        datamodule = self._datamodule(trainer)
        if datamodule is None or trainer.sanity_checking:
            return
        mean, ci95 = mean_ci95(self.returns(datamodule, "val", datamodule.val_episodes, datamodule.adapt_online).returns)
        pl_module.log_dict({"val/return": mean, "val/return_ci95": ci95}, sync_dist=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The held-out bodies with and without adaptation, their paired gain, and the model's error over the episodes."""
        datamodule = self._datamodule(trainer)
        if datamodule is None:
            return
        count = datamodule.test_episodes
        adapted = self.returns(datamodule, "test", count, adapt=True) if datamodule.adapt_online else None
        unadapted = self.returns(datamodule, "test", count, adapt=False)
        results: dict[str, Any] = {}
        main = adapted if adapted is not None else unadapted
        results["return"], results["return_ci95"] = mean_ci95(main.returns)
        results["return_unadapted"], results["return_unadapted_ci95"] = mean_ci95(unadapted.returns)
        random = datamodule.episodes("test", 0, count, datamodule.random_policy(datamodule.eval_seed, CONTROLLER, SPLIT_CODES["test"]))
        results["return_random"], results["return_random_ci95"] = mean_ci95(random.returns)
        if adapted is not None:
            results["adaptation_gain"], results["adaptation_gain_ci95"] = mean_ci95(adapted.returns - unadapted.returns)
            errors = prediction_errors(datamodule, adapted)
            results["model_error_adapted"] = float(errors["adapted"].mean())
            results["model_error_unadapted"] = float(errors["unadapted"].mean())
            writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None) if trainer.is_global_zero else None
            if writer is not None:
                # drawn with the process's backend (Agg without a display; inline in a notebook, which switching to Agg here
                # would leave without figures), closed at once
                import matplotlib.pyplot as plt

                writer.add_figure("test_dynamics/model_error", plot_model_error(errors, datamodule.past), global_step=pl_module.global_step, close=True)
                plt.close("all")
        results["n_episodes"] = count
        pl_module.log_dict({f"test/{k}": float(v) for k, v in results.items()}, sync_dist=True)
        self._test = results
        if trainer.is_global_zero:
            line = f"Held-out bodies ({count} episodes of {datamodule.episode_length} steps): return {results['return']:.1f} ± {results['return_ci95']:.1f}"
            if adapted is not None:
                line += (
                    f" adapted, {results['return_unadapted']:.1f} ± {results['return_unadapted_ci95']:.1f} without adaptation; "
                    f"gap {results['adaptation_gain']:+.1f} ± {results['adaptation_gain_ci95']:.1f} (paired)"
                )
            print(f"{line}; a random policy {results['return_random']:.1f} ± {results['return_random_ci95']:.1f}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the controller's figures to the learner's test_results (eval.py's JSON, train.py's summary)."""
        if self._test:
            pl_module.test_results = {**getattr(pl_module, "test_results", {}), **self._test}
            self._test = {}
