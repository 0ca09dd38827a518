"""The baseline every text learner must beat: nearest class centroid of WordLlama's mean-pooled embeddings, no training at all.

An utterance is embedded as WordLlama's own embed() does it: the mean of its tokens' pretrained rows over the
real tokens (no special tokens, pads masked out). A query goes to the class whose centroid (mean of its support
embeddings) is nearest. Two distances: cosine (the headline, test/untrained_centroid_acc: WordLlama's own
similarity; a mean of token rows grows or shrinks with the utterance's length, which the cosine ignores and
the Euclidean distance reads as meaning) and squared Euclidean (test/untrained_centroid_euclid_acc: ProtoNets'
distance, so `experiment=untrained_centroid` — ProtoNets on the mean itself, never trained — gives the same figure).
`UntrainedCentroid` scores it on the very test batches the learner is scored on.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from metalight.algorithms.base import mean_and_ci95
from metalight.text.pretrained import PAD_ID, load_embeddings

log = logging.getLogger(__name__)

DISTANCES = ("cos", "euclid")


def mean_pooled(table: Tensor, ids: Tensor) -> Tensor:
    """WordLlama's sentence embedding [..., d] of token ids [..., L]: the mean of the real tokens' rows (0 for an empty row)."""
    mask = (ids != PAD_ID).to(table.dtype).unsqueeze(-1)
    return (F.embedding(ids, table) * mask).sum(-2) / mask.sum(-2).clamp_min(1.0)


def centroid_accuracies(table: Tensor, batch: dict[str, Tensor], distance: str) -> Tensor:
    """Query accuracy [B] of each task of an episode batch, each query given the class of its nearest support centroid."""
    support, queries = mean_pooled(table, batch["support_x"]), mean_pooled(table, batch["query_x"])
    if distance == "cos":
        support, queries = F.normalize(support, dim=-1), F.normalize(queries, dim=-1)
    n_way = int(batch["support_y"].max()) + 1
    one_hot = F.one_hot(batch["support_y"], n_way).to(support.dtype)  # [B, S, N]
    centroids = one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)  # [B, N, d]
    scores = queries @ F.normalize(centroids, dim=-1).transpose(1, 2) if distance == "cos" else -torch.cdist(queries, centroids)
    return (scores.argmax(-1) == batch["query_y"]).to(torch.float64).mean(-1)


class UntrainedCentroid(Callback):
    """On text data, scores the untrained centroid baseline on every test batch the learner sees and reports it beside the learner.

    Logs test/untrained_centroid_acc (cosine) and test/untrained_centroid_euclid_acc with their ci95 (the sums are
    reduced over DDP ranks as the learner's), adds them to the learner's test_results (eval.py's JSON) and prints
    one line with both figures and the learner's. Does nothing for other data or with a tokenizer of its own.
    """

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self.sums: Tensor | None = None  # per distance: tasks, sum of accuracies, sum of squares

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the pretrained table (once) when the data is text tokenized by WordLlama's tokenizer."""
        datamodule = trainer.datamodule
        self.sums = None
        if getattr(datamodule, "modality", None) != "text" or getattr(datamodule, "tokenizer", None) is not None:
            return
        if self.table is None:
            self.table = load_embeddings()
        self.table = self.table.to(pl_module.device)
        self.sums = torch.zeros(len(DISTANCES), 3, dtype=torch.float64, device=pl_module.device)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score this batch's tasks (the learner's own test episodes) by their centroids."""
        if self.sums is None:
            return
        with torch.no_grad():
            for row, distance in enumerate(DISTANCES):
                accs = centroid_accuracies(self.table, batch, distance)
                self.sums[row] += torch.stack([accs.new_tensor(float(len(accs))), accs.sum(), (accs**2).sum()])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce over ranks and log test/untrained_centroid_{acc,euclid_acc} and their ci95."""
        if self.sums is None:
            return
        sums = trainer.strategy.reduce(self.sums, reduce_op="sum").tolist()
        self.results = {}
        for (n, total, squares), distance in zip(sums, DISTANCES):
            name = "untrained_centroid_acc" if distance == "cos" else f"untrained_centroid_{distance}_acc"
            mean, ci95 = mean_and_ci95(total, squares, int(n))
            self.results |= {name: mean, f"{name}_ci95": ci95}
        self.n_tasks = int(sums[0][0])
        pl_module.log_dict({f"test/{k}": v for k, v in self.results.items()}, sync_dist=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the baseline into the learner's test_results and print it beside the learner's accuracy."""
        if self.sums is None:
            return
        self.sums = None
        results = getattr(pl_module, "test_results", None)
        if isinstance(results, dict):
            results.update(self.results)
        if trainer.is_global_zero and isinstance(results, dict) and "acc" in results:
            log.info(
                "Test accuracy %.2f ± %.2f%%; untrained centroid baseline on the same %d test episodes: %.2f ± %.2f%% (cosine), %.2f ± %.2f%% (Euclidean).",
                100 * results["acc"], 100 * results["acc_ci95"], self.n_tasks,
                100 * self.results["untrained_centroid_acc"], 100 * self.results["untrained_centroid_acc_ci95"],
                100 * self.results["untrained_centroid_euclid_acc"], 100 * self.results["untrained_centroid_euclid_acc_ci95"],
            )
