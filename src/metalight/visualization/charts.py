"""The TensorBoard writer of a run, its per-inner-step charts, and reading a run's event files back (notebooks), for any task kind."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The SummaryWriter of the trainer's TensorBoardLogger, or None when it logs elsewhere (or not at all)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def layout(metric: str) -> dict[str, dict[str, list]]:
    """The Custom Scalars layout of a run scored by `metric` (acc, mse): per inner step, and before vs after adaptation."""
    return {
        metric: {
            f"val: {metric} per inner step ({metric}_step0 = before adaptation)": ["Multiline", [rf"^val/{metric}_step\d+$"]],
            f"test: {metric} per inner step": ["Multiline", [rf"^test/{metric}_step\d+$"]],
            "before vs after adaptation": ["Multiline", [rf"^(train|val|test)/{metric}(_before)?$"]],
        }
    }


class AccuracyCharts(Callback):
    """Lay out TensorBoard's Custom Scalars tab: the task's metric (accuracy, MSE) per inner step, one line per step, and before vs after."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write the layout into the run's event file (rank 0, TensorBoardLogger only)."""
        writer = tensorboard_writer(trainer) if trainer.is_global_zero else None
        if writer is not None:
            kind = getattr(trainer.datamodule, "kind", None)  # callbacks are set up before the module takes it
            writer.add_custom_scalars(layout(kind.metric if kind is not None else getattr(pl_module, "metric", "acc")))


def _event_folder(run_dir: str | Path) -> Path:
    """The one folder of `run_dir` (or below it) holding TensorBoard event files."""
    folders = sorted({path.parent for path in Path(run_dir).rglob("events.out.tfevents.*")})
    if not folders:
        raise FileNotFoundError(
            f"no TensorBoard event files under {run_dir}: pass a run folder (logs/train/runs/<time>/) of a run "
            "made with logger=tensorboard."
        )
    if len(folders) > 1:
        raise ValueError(f"{run_dir} holds the event files of several runs ({', '.join(map(str, folders))}): pass one of them.")
    return folders[0]


def read_scalars(run_dir: str | Path) -> dict[str, dict[str, list]]:
    """Every scalar series of a run as {tag: {"step": [...], "value": [...]}}, by step (a re-logged step keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # here: training never reads events

    events = EventAccumulator(str(_event_folder(run_dir)), size_guidance={"scalars": 0})
    events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        by_step = {event.step: event.value for event in events.Scalars(tag)}
        steps = sorted(by_step)
        series[tag] = {"step": steps, "value": [by_step[s] for s in steps]}
    return series


def inner_step_accuracy(scalars: dict[str, dict[str, list]], stage: str = "val", metric: str = "acc") -> list[float]:
    """The metric (accuracy; mse for regression) after 0, 1, ... inner steps (`<stage>/<metric>_step<k>`) at a run's last evaluation; [] if none."""
    pattern = re.compile(rf"^{re.escape(stage)}/{re.escape(metric)}_step(\d+)$")
    found = {int(m.group(1)): scalars[tag]["value"][-1] for tag in scalars if (m := pattern.match(tag))}
    return [found[k] for k in sorted(found)]
