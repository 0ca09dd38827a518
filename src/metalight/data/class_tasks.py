"""ClassTaskDataModule: N-way K-shot tasks over the classes of three splits, whatever their items are (images, token ids).

What FewShotDataModule (images) and TextDataModule (utterances) share: the task shapes of training and evaluation
and their checks, classes too small for a task (data.small_classes), N-way larger than a split, flat training for
algo=baseline, train_on_val, and building the episode (or flat) datasets from SplitImages, whose `images` may hold
any per-item array [n, ...] with class starts and counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from metalight.data.episodes import EpisodeDataset
from metalight.data.flat import TRAIN_MODES, LabelledImages
from metalight.data.images import SplitImages
from metalight.data.preprocess import Augment, InputFormat
from metalight.errors import ConfigError, DataError
from metalight.tasks.datamodule import TaskDataModule, check_whole_number

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
SMALL_CLASSES = ("error", "drop")


@dataclass(frozen=True)
class TaskShape:
    """n_way, k_shot and k_query of one split's tasks, each with the config key that set it (for messages)."""

    n_way: tuple[str, int]
    k_shot: tuple[str, int]
    k_query: tuple[str, int]


class ClassTaskDataModule(TaskDataModule):
    """Few-shot tasks (or flat batches for algo=baseline) over train/val/test splits of classes; subclasses load the splits.

    Training tasks are n_way_train-way k_shot_train-shot with k_query_train queries per class (each null = the
    evaluation value). `dataset` and `split` name the data in messages; `items` names what a class holds
    ("images", "utterances"). After setup(): `train_classes`, `val_classes`, `test_classes` (class counts) and
    `images_per_class` / `max_images_per_class` (the smallest / largest class).
    """

    items = "images"

    def __init__(
        self,
        dataset: str,
        split: object,
        n_way: int,
        k_shot: int,
        k_query: int,
        n_way_train: int | None,
        k_shot_train: int | None,
        k_query_train: int | None,
        meta_batch_size: int,
        eval_batch_size: int,
        batches_per_epoch: int,
        n_val_tasks: int,
        n_test_tasks: int,
        seed: int,
        eval_seed: int,
        small_classes: str,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        train_mode: str,
        batch_size: int | None,
        train_on_val: bool,
    ) -> None:
        train_keys = {"n_way": n_way_train, "k_shot": k_shot_train, "k_query": k_query_train}
        positive = dict(n_way=n_way, k_shot=k_shot, k_query=k_query)  # the stream's own settings: TaskDataModule checks the shared ones
        positive |= {f"{name}_train": value for name, value in train_keys.items() if value is not None}
        for name, value in positive.items():
            check_whole_number(name, value, 1)
        if train_mode not in TRAIN_MODES:
            raise ConfigError(f"data.train_mode={train_mode!r} is not known: use episodes (meta-learners) or flat (algo=baseline).")
        if train_mode == "flat":
            check_whole_number("batch_size", batch_size, 1)
        if small_classes not in SMALL_CLASSES:
            raise ConfigError(f"data.small_classes={small_classes!r} is not valid: use error or drop.")
        super().__init__(
            meta_batch_size, eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed,
            num_workers, pin_memory, persistent_workers,
        )
        self.dataset, self.split = dataset, split
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.n_way_train = n_way if n_way_train is None else n_way_train
        self.k_shot_train = k_shot if k_shot_train is None else k_shot_train
        self.k_query_train = k_query if k_query_train is None else k_query_train
        self._shapes = {
            "train": TaskShape(
                *(((f"{name}_train" if value is not None else name), getattr(self, f"{name}_train")) for name, value in train_keys.items())
            ),
            "eval": TaskShape(("n_way", n_way), ("k_shot", k_shot), ("k_query", k_query)),
        }
        self.small_classes, self.train_mode, self.batch_size, self.train_on_val = small_classes, train_mode, batch_size, train_on_val
        self.images_per_class = self.max_images_per_class = 0
        self.train_classes = self.val_classes = self.test_classes = 0

    def input_format(self) -> InputFormat:
        """How this data's inputs reach the model (images: size, channels, mean/std; text: tokenizer, max_tokens): what a
        trained learner applies to its own. Subclasses say."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Build the caches and check the tasks fit: setup() on one process per node."""
        self.setup()

    def _enough_images(self, part: str, data: SplitImages, shape: TaskShape) -> SplitImages:
        """The split without its classes too small for k_shot + k_query items (data.small_classes=drop), or DataError."""
        (shot_key, shots), (query_key, queries) = shape.k_shot, shape.k_query
        need = shots + queries
        small = np.flatnonzero(data.counts < need)
        if not len(small):
            return data
        what = f"data.{shot_key}={shots} + data.{query_key}={queries} = {need} {self.items} per class"
        largest = int(data.counts.max())
        if len(small) == len(data.classes):
            raise DataError(
                f"{what}, but the {part} split of {self.dataset} has at most {largest} per class: lower them to "
                f"sum to at most {largest}."
            )
        listed = ", ".join(f"{data.classes[c]!r} ({data.counts[c]})" for c in small[:10])
        listed += f" and {len(small) - 10} more" if len(small) > 10 else ""
        counted = f"{len(small)} of the {len(data.classes)} classes of the {part} split of {self.dataset} hold fewer"
        if self.small_classes == "error":
            raise DataError(
                f"{what}, but {counted}: {listed}. Lower them, add {self.items} to those classes, or set "
                "data.small_classes=drop to leave those classes out."
            )
        log.warning("%s, but %s; left out (data.small_classes=drop): %s.", what, counted, listed)
        dropped = set(small.tolist())
        return data.subset([name for c, name in enumerate(data.classes) if c not in dropped])

    def _enough_classes(self, data: SplitImages) -> SplitImages:
        """The train split of flat training (every item counts, whatever its class's size), or DataError below 2 classes."""
        if len(data.classes) < 2:
            raise DataError(
                f"data.train_mode=flat (algo=baseline) pretrains a classifier over the training classes, but the train split "
                f"of {self.dataset} ({self.split}) has {len(data.classes)}: give it at least 2 classes (your own data: "
                "train.txt or data.source.ratios), or use a meta-learner (e.g. algo=protonet)."
            )
        return data

    def _checked_splits(self, loaded: dict[str, SplitImages]) -> dict[str, SplitImages]:
        """The three splits (train joined with val under data.train_on_val), each checked to fit its tasks; counts recorded."""
        if self.train_on_val:
            loaded = {**loaded, "train": loaded["train"].joined(loaded["val"])}
            log.warning(
                "data.train_on_val=true: the %d validation classes join the training classes, so validation scores "
                "classes seen in training.", len(loaded["val"].classes),
            )
        splits: dict[str, SplitImages] = {}
        for part in PARTS:
            if part == "train" and self.train_mode == "flat":
                splits[part] = self._enough_classes(loaded[part])
                continue
            shape = self._shapes["train" if part == "train" else "eval"]
            data = self._enough_images(part, loaded[part], shape)
            (way_key, n_way), dropped = shape.n_way, len(loaded[part].classes) - len(data.classes)
            if n_way > len(data.classes):
                after = f" once the {dropped} with too few {self.items} are left out" if dropped else ""
                raise DataError(
                    f"data.{way_key}={n_way} but the {part} split of {self.dataset} ({self.split}) has only "
                    f"{len(data.classes)} classes{after}: lower data.{way_key} to at most {len(data.classes)}."
                )
            splits[part] = data
        self.train_classes, self.val_classes, self.test_classes = (len(splits[p].classes) for p in PARTS)
        counts = np.concatenate([splits[p].counts for p in PARTS])
        self.images_per_class, self.max_images_per_class = int(counts.min()), int(counts.max())
        return splits

    def _task_datasets(
        self,
        splits: dict[str, SplitImages],
        augment: Augment | None = None,
        groups: Callable[[str, SplitImages, tuple[str, int]], np.ndarray | None] | None = None,
    ) -> dict[str, Dataset]:
        """EpisodeDatasets of the splits (the training one flat under data.train_mode=flat); `augment` applies to training only.

        groups(part, split, (n_way key, n_way)) gives each class's group when tasks stay within one (Omniglot's alphabets).
        """
        datasets: dict[str, Dataset] = {}
        for part in PARTS:
            shape, data = self._shapes["train" if part == "train" else "eval"], splits[part]
            if part == "train" and self.train_mode == "flat":
                datasets[part] = LabelledImages(
                    data.images, data.starts, data.counts, self.seed, self.batch_size * self.batches_per_epoch, augment
                )
                continue
            datasets[part] = EpisodeDataset(
                data.images,
                part,
                self.seed if part == "train" else self.eval_seed,
                shape.n_way[1],
                shape.k_shot[1],
                shape.k_query[1],
                data.starts,
                data.counts,
                None if groups is None else groups(part, data, shape.n_way),
                augment if part == "train" else None,
            )
        return datasets

    def train_batch(self) -> tuple[str, int]:
        """Flat training (algo=baseline) steps on data.batch_size items, episodic training on data.meta_batch_size tasks."""
        return ("batch_size", self.batch_size) if self.train_mode == "flat" else ("meta_batch_size", self.meta_batch_size)
