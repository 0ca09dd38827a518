"""Text tasks in TensorBoard: a validation episode as a table of utterances and predictions, the test classes' embeddings in the projector.

* `episode_table` writes one task as Markdown (TensorBoard's Text tab renders it): each class with its support
  utterances, then each query with its class, the prediction before and after adaptation, and right or wrong.
* `log_text_task` puts that table of validation task 0 into TensorBoard (ValidationTaskImage calls it for text data).
* `TestEmbeddings` embeds the test classes' utterances with the trained body once testing ends and adds them to
  TensorBoard's Projector tab, each point labelled with its utterance and class.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from metalight.visualization.charts import tensorboard_writer

TEXT_LEGEND = (
    "Validation task {task}: each class's support utterances, then each query with its class and the learner's "
    "prediction{before}; ✓ right, ✗ wrong. Utterances are shown as the model read them (tokenized, cut at data.max_tokens)."
)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell (pipes escaped, line breaks as spaces)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def episode_table(
    support: Sequence[str], support_y: Tensor, query: Sequence[str], query_y: Tensor, classes: Sequence[str], before: Tensor | None, after: Tensor
) -> str:
    """One task as two Markdown tables: support utterances per class (label, class name, utterances) and the queries'
    predictions (query, class, prediction before adaptation when `before` is given, after, right or wrong)."""
    lines = ["| label | class | support utterances |", "|---|---|---|"]
    for c, name in enumerate(classes):
        texts = [_cell(t) for t, y in zip(support, support_y.tolist()) if y == c]
        lines.append(f"| {c} | {_cell(name)} | {' · '.join(texts)} |")
    head = ["query", "class"] + (["before"] if before is not None else []) + ["predicted", ""]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, (text, y) in enumerate(zip(query, query_y.tolist())):
        guess = int(after[j])
        row = [_cell(text), _cell(classes[y])] + ([_cell(classes[int(before[j])])] if before is not None else [])
        row += [_cell(classes[guess]), "✓" if guess == y else "✗"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def log_text_task(trainer: pl.Trainer, task: dict[str, Tensor], before: Tensor | None, after: Tensor, step: int) -> None:
    """Add validation task 0 (`task`: its tensors, one task) and its predicted query labels to TensorBoard as a table."""
    writer = tensorboard_writer(trainer)
    datamodule = trainer.datamodule
    if writer is None or not hasattr(datamodule, "task_class_names"):
        return
    decode = datamodule.input_format().decode
    classes = datamodule.task_class_names("val", 0)
    table = episode_table(decode(task["support_x"]), task["support_y"].cpu(), decode(task["query_x"]), task["query_y"].cpu(), classes, before, after)
    right = float((after.cpu() == task["query_y"].cpu()).float().mean())
    legend = TEXT_LEGEND.format(task=0, before=" before and after adaptation" if before is not None else "")
    writer.add_text("val_task/episode", f"{legend}\n\nQuery accuracy {right:.3f}.\n\n{table}", global_step=step)


def _metadata(text: str) -> str:
    """A projector metadata cell: one line without tabs (its TSV file splits on them)."""
    return " ".join(str(text).split()) or "(empty)"


class TestEmbeddings(Callback):
    """Once testing ends on text data, the trained body's embeddings of the test classes' utterances in TensorBoard's projector.

    The first `per_class` utterances of every test class (all of them when fewer) are embedded by model.features
    (the meta-trained body, as FewShotLearner.embed does) and written with add_embedding, each point's metadata its
    utterance (as the model read it) and its class, so the projector colours and searches them by class. Rank 0 only;
    nothing without a TensorBoardLogger, for other data, or for a model without a separable body.
    """

    def __init__(self, per_class: int = 50, chunk: int = 512) -> None:
        self.per_class, self.chunk = per_class, chunk

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Embed the test utterances and add them (with their metadata) to the projector."""
        datamodule = trainer.datamodule
        features = getattr(getattr(pl_module, "model", None), "features", None)
        if getattr(datamodule, "modality", None) != "text" or not isinstance(features, nn.Module) or not trainer.is_global_zero:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        ids, labels = datamodule.utterances("test", self.per_class)
        with torch.no_grad():
            vectors = torch.cat([features(part.to(pl_module.device)).float().cpu() for part in ids.split(self.chunk)])
        names = datamodule.label_names("test")
        texts = datamodule.input_format().decode(ids)
        metadata = [[_metadata(text), _metadata(names[c])] for text, c in zip(texts, labels)]
        writer.add_embedding(vectors, metadata=metadata, metadata_header=["utterance", "class"], tag="test_embeddings", global_step=trainer.global_step)
        writer.flush()
