"""Image tasks as pictures: task image grids, predictions before/after adaptation, and the validation task in TensorBoard.

* `task_grid` draws one task as an image, a row per class: its support images, a gap, its query
  images; a query image's outer frame says whether the meta-parameters classify it correctly (before
  adaptation), its inner frame whether the adapted weights do (green right, red wrong); `show_task`
  puts it on a matplotlib Axes with labelled rows (notebooks; matplotlib itself is not imported here).
* `query_predictions` adapts tasks exactly as validation and test do and returns the predicted query
  labels before and after.
* `attention_grid` draws how a learner that reads the support set by attention (SNAIL) weighs each support
  image from each query.
* `ValidationTaskImage` logs that picture of validation task 0 at every validation (image classification),
  and its attention picture when the learner has one (`support_attention`); for text data the same task as a
  table of utterances (visualization/text.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchvision.utils import make_grid

from metalight.algorithms.base import EpisodicModule
from metalight.visualization.charts import tensorboard_writer
from metalight.visualization.text import log_text_task

Task = dict[str, Tensor]

RIGHT = (0.1, 0.75, 0.2)
WRONG = (0.9, 0.1, 0.1)
SUPPORT = (0.2, 0.45, 0.95)
NEUTRAL = (0.55, 0.55, 0.55)
LEGEND = (
    "Validation task 0, one row per class (the row number is the label): support images (blue frame), a gap, "
    "query images. Query frames, outer: prediction of the meta-parameters (before adaptation), inner: after "
    "adaptation; green right, red wrong."
)
LEGEND_NO_ADAPTATION = (
    "Validation task 0, one row per class (the row number is the label): support images (blue frame), a gap, "
    "query images. Inner query frame: the learner's prediction (it does not adapt: the outer frame stays grey); "
    "green right, red wrong."
)

ATTENTION_LEGEND = (
    "Validation task 0: the last attention block's weights from each query (a row: the query image, then one cell per "
    "support image) over the support images (top row, in the task's order, class by class); from white (0) to dark "
    "blue (1, all the weight on one image). A query's weight on itself is left out."
)


def unnormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalized float images [..., C, H, W] back to [0, 1] (x * std + mean per channel), on the CPU."""
    images = images.detach().float().cpu()
    shape = (-1, 1, 1)
    return (images * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)).clamp(0.0, 1.0)


def _framed(images: Tensor, outer: Sequence[tuple[float, float, float]], inner: Sequence[tuple[float, float, float]], width: int) -> Tensor:
    """RGB images [n, 3, H, W] inside two rings of `width` pixels, colored per image: [n, 3, H + 4w, W + 4w]."""
    n, _, h, w = images.shape
    out = torch.empty(n, 3, h + 4 * width, w + 4 * width)
    out[:] = torch.tensor(outer).view(n, 3, 1, 1)
    out[:, :, width:-width, width:-width] = torch.tensor(inner).view(n, 3, 1, 1)
    out[:, :, 2 * width : -2 * width, 2 * width : -2 * width] = images
    return out


def _by_class(labels: Tensor, n_way: int, what: str) -> list[Tensor]:
    """Indices of each class's examples, checking every class has as many (the grid is a rectangle)."""
    rows = [torch.nonzero(labels == c).flatten() for c in range(n_way)]
    if len({len(r) for r in rows}) != 1:
        counts = [len(r) for r in rows]
        raise ValueError(f"{what} has {counts} examples per class: a task grid needs the same number in every class.")
    return rows


def task_grid(
    task: Task,
    mean: Sequence[float],
    std: Sequence[float],
    before: Tensor | None = None,
    after: Tensor | None = None,
) -> Tensor:
    """One task as an RGB image [3, H, W] in [0, 1]: a row per class, support | gap | query, predictions as frame colors.

    `task` holds support_x [N*K, C, H, W], support_y [N*K], query_x [N*Q, C, H, W], query_y [N*Q] (normalized
    images, as the algorithms get them); `before`/`after` are predicted query labels [N*Q], or None.
    """
    support_y, query_y = task["support_y"].cpu(), task["query_y"].cpu()
    n_way = int(support_y.max()) + 1
    support = unnormalize(task["support_x"], mean, std).expand(-1, 3, -1, -1)
    query = unnormalize(task["query_x"], mean, std).expand(-1, 3, -1, -1)
    width = max(1, support.shape[-1] // 14)

    def colors(predicted: Tensor | None) -> list[tuple[float, float, float]]:
        if predicted is None:
            return [NEUTRAL] * len(query_y)
        return [RIGHT if bool(p == y) else WRONG for p, y in zip(predicted.cpu(), query_y)]

    support = _framed(support, [SUPPORT] * len(support), [SUPPORT] * len(support), width)
    query = _framed(query, colors(before), colors(after), width)
    gap = torch.ones_like(support[:1])
    tiles = []
    support_rows, query_rows = _by_class(support_y, n_way, "support set"), _by_class(query_y, n_way, "query set")
    for s, q in zip(support_rows, query_rows):
        tiles += [support[s], gap, query[q]]
    per_row = len(support_rows[0]) + 1 + len(query_rows[0])
    return make_grid(torch.cat(tiles), nrow=per_row, padding=width, pad_value=1.0)


def attention_grid(task: Task, weights: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """An RGB image [3, H, W] of attention weights [Q, S] from each query of `task` over its support images.

    Top row: a blank corner, then the support images; below, a row per query: the query image, then a cell per
    support image, from white (weight 0) to dark blue (weight 1).
    """
    support = unnormalize(task["support_x"], mean, std).expand(-1, 3, -1, -1)
    query = unnormalize(task["query_x"], mean, std).expand(-1, 3, -1, -1)
    width = max(1, support.shape[-1] // 14)
    support = _framed(support, [SUPPORT] * len(support), [SUPPORT] * len(support), width)
    query = _framed(query, [NEUTRAL] * len(query), [NEUTRAL] * len(query), width)
    shade = weights.detach().float().cpu().clamp(0.0, 1.0).view(*weights.shape, 1, 1, 1)
    white, dark = torch.ones(3, 1, 1), torch.tensor(SUPPORT).view(3, 1, 1) * 0.5
    cells = white + shade * (dark - white)  # [Q, S, 3, 1, 1]
    cells = cells.expand(-1, -1, -1, *support.shape[-2:])
    rows = [torch.cat([torch.ones_like(support[:1]), support])]
    rows += [torch.cat([q.unsqueeze(0), c]) for q, c in zip(query, cells)]
    return make_grid(torch.cat(rows), nrow=len(support) + 1, padding=width, pad_value=1.0)


def show_task(
    ax: Any,
    task: Task,
    mean: Sequence[float],
    std: Sequence[float],
    before: Tensor | None = None,
    after: Tensor | None = None,
    title: str = "",
) -> None:
    """Draw `task_grid` on a matplotlib Axes, rows labelled with their class label, columns as support and query."""
    grid = task_grid(task, mean, std, before, after)
    ax.imshow(grid.permute(1, 2, 0).numpy())
    n_way = int(task["support_y"].max()) + 1
    k_shot, k_query = len(task["support_y"]) // n_way, len(task["query_y"]) // n_way
    row, column = grid.shape[1] / n_way, grid.shape[2] / (k_shot + 1 + k_query)
    ax.set_yticks([(c + 0.5) * row for c in range(n_way)], [f"label {c}" for c in range(n_way)])
    ax.set_xticks([k_shot / 2 * column, (k_shot + 1 + k_query / 2) * column], ["support", "query"])
    ax.set_title(title)


def query_predictions(algorithm: EpisodicModule, batch: Task, stream: str = "val", task_ids: Sequence[int] | None = None) -> tuple[Tensor | None, Tensor]:
    """Predicted query labels [B, N*Q] before (None for a learner without inner loop) and after adapting each task of `batch`.

    The tasks are scored by the algorithm's own evaluation (same inner loop, same minibatches for the
    task numbers `task_ids` of `stream`, default 0..B-1), so the accuracy of `after` is the task's
    reported accuracy. The batch holds normalized images on the algorithm's device.
    """
    task_ids = list(range(batch["support_x"].shape[0])) if task_ids is None else list(task_ids)
    predicted = algorithm.evaluate_tasks(batch, stream, task_ids, keep_logits=True).logits.argmax(-1)
    return (predicted[:, 0] if algorithm.adapts else None), predicted[:, -1]


class ValidationTaskImage(Callback):
    """At every validation, log validation task 0 as an image (`val_task/episode`) with its predictions before/after adaptation.

    A learner that reads the support set by attention (one with `support_attention`, SNAIL) also gets
    `val_task/attention`: each query's weights over the support images (attention_grid). On text data the
    episode is a table under Text instead (`val_task/episode`: log_text_task, the same predictions).

    The task is the first one of the first validation batch on rank 0, which is the fixed validation task
    0 (data.eval_seed), so the pictures of successive validations differ only by the predictions. It is
    adapted once more for the picture (one task: cheap beside the validation itself). Needs a
    TensorBoardLogger (logger=tensorboard); without one, or for tasks that are not classification of images
    or texts (regression has RegressionFits), it does nothing.
    """

    def __init__(self) -> None:
        self._task: Task | None = None

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep task 0 of the first batch (already on the device: normalized images, or token ids)."""
        x = batch["support_x"] if "support_x" in batch else None
        # [B, N*K, C, H, W] images or [B, N*K, L] token ids: classification tasks (not RL's task parameters, not regression's floats)
        classes = x is not None and (x.dim() == 5 or (x.dim() == 3 and not x.is_floating_point()))
        if batch_idx == 0 and classes and trainer.is_global_zero and not trainer.sanity_checking:
            self._task = {k: v[:1].detach().clone() for k, v in batch.items()}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adapt the kept task, draw it, and add the image and its legend to TensorBoard."""
        task, self._task = self._task, None
        writer = tensorboard_writer(trainer) if task is not None else None
        if writer is None:
            return
        before, after = query_predictions(pl_module, task, stream="val", task_ids=[0])
        datamodule = trainer.datamodule
        single = {k: v[0] for k, v in task.items()}
        # the step Lightning logs the val/* scalars at (its own LearningRateMonitor reads the same counter)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if getattr(datamodule, "modality", None) == "text":  # utterances: a table under Text instead of a picture
            log_text_task(trainer, single, None if before is None else before[0].cpu(), after[0].cpu(), step)
            return
        image = task_grid(single, datamodule.mean, datamodule.std, None if before is None else before[0], after[0])
        writer.add_image("val_task/episode", image, global_step=step)
        query_y = single["query_y"]
        after_score = float((after[0] == query_y).float().mean())
        if before is None:
            summary = f"{LEGEND_NO_ADAPTATION}\n\nQuery accuracy {after_score:.3f}."
        else:
            summary = f"{LEGEND}\n\nQuery accuracy before adaptation {float((before[0] == query_y).float().mean()):.3f}, after {after_score:.3f}."
        writer.add_text("val_task/legend", summary, global_step=step)
        support_attention = getattr(pl_module, "support_attention", None)
        if callable(support_attention):
            weights = support_attention(single, stream="val", task_id=0)
            writer.add_image("val_task/attention", attention_grid(single, weights, datamodule.mean, datamodule.std), global_step=step)
            own = (weights * (single["query_y"].unsqueeze(1) == single["support_y"].unsqueeze(0))).sum(1) / weights.sum(1)
            summary = f"{ATTENTION_LEGEND}\n\nShare of the support weight on the query's own class: {float(own.mean()):.3f}."
            writer.add_text("val_task/attention_legend", summary, global_step=step)
