"""FewShotDataModule: any configured data set as deterministic, rank-sharded meta-batches of few-shot tasks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalight.data import cifar, cub, folder, miniimagenet, omniglot, tiered_imagenet
from metalight.data.class_tasks import PARTS, ClassTaskDataModule
from metalight.data.images import SplitImages, channel_stats
from metalight.data.preprocess import Augment, ImageFormat, build_transforms, normalize
from metalight.errors import ConfigError, DataError
from metalight.tasks.datamodule import check_whole_number, plain_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _DatasetSpec:
    """How to load one data set, its splits, what its images look like, and the data.source keys it reads."""

    load: Callable[..., dict[str, SplitImages]]
    splits: tuple[str, ...]
    channels: int | None  # None: whatever data.channels says (the loader converts the images)
    downloadable: bool
    options: tuple[str, ...] = ()
    invert: bool = False  # decoded as 255 - x (Omniglot: strokes bright on a dark background)


DATASETS = {
    "omniglot": _DatasetSpec(omniglot.load_omniglot, omniglot.SPLITS, channels=1, downloadable=True, invert=omniglot.INVERT),
    "miniimagenet": _DatasetSpec(miniimagenet.load_miniimagenet, miniimagenet.SPLITS, channels=3, downloadable=False),
    "folder": _DatasetSpec(folder.load_folder, folder.SPLITS, None, downloadable=False, options=folder.OPTIONS),
    "cifar_fs": _DatasetSpec(cifar.load_cifar_fs, cifar.CIFAR_FS_SPLITS, 3, downloadable=True, options=cifar.OPTIONS),
    "fc100": _DatasetSpec(cifar.load_fc100, cifar.FC100_SPLITS, 3, downloadable=True, options=cifar.OPTIONS),
    "tiered_imagenet": _DatasetSpec(tiered_imagenet.load_tiered_imagenet, tiered_imagenet.SPLITS, 3, False),
    "cub": _DatasetSpec(cub.load_cub, cub.SPLITS, 3, downloadable=False, options=cub.OPTIONS),
}


def _channels_and_statistics(
    dataset: str, spec: _DatasetSpec, channels: int | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[int, list[float] | None, list[float] | None]:
    """The images' channel count and the per-channel mean/std (None: from the data), checked; ConfigError otherwise."""
    if spec.channels is None:
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels!r}: {dataset} images are read as 1 (grey) or 3 (RGB) channels; set one.")
    elif channels is not None and channels != spec.channels:
        raise ConfigError(
            f"data.channels={channels} but {dataset} images have {spec.channels} channel(s): "
            f"set data.channels={spec.channels}."
        )
    n_channels = spec.channels or int(channels)  # type: ignore[arg-type]
    if (mean is None) != (std is None):
        raise ConfigError(f"data.mean={mean} / data.std={std}: set both, or both to null (computed from the training images).")
    if mean is None or std is None:
        return n_channels, None, None
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != n_channels or len(std) != n_channels:
        raise ConfigError(
            f"data.mean={mean} / data.std={std}: {dataset} has {n_channels} channel(s), so each needs {n_channels} value(s)."
        )
    if min(std) <= 0:
        raise ConfigError(f"data.std={std} must be positive in every channel.")
    return n_channels, mean, std


class FewShotDataModule(ClassTaskDataModule):
    """Meta-batches of few-shot tasks (uint8 on the host, normalized float32 on the device) for MAML-style training.

    Batches are dicts: support_x [B, N*K, C, H, W], support_y [B, N*K], query_x [B, N*Q, C, H, W],
    query_y [B, N*Q], B = meta_batch_size / world_size tasks for training, up to eval_batch_size for val/test.
    Training tasks are n_way_train-way k_shot_train-shot with k_query_train queries per class (each
    null = the evaluation value). Training task i of epoch e is a function of (seed, "train", e, i); the
    val/test tasks are the fixed sets 0..n-1 of (eval_seed, split, 0, i), dealt to ranks round-robin.
    After setup(): `channels`, `mean`, `std`, `train_classes`, `val_classes`, `test_classes` (class
    counts) and `images_per_class` / `max_images_per_class` (the smallest / largest class).
    train_mode="flat" (set by algo=baseline) trains on labelled images instead: batches {"x": [b, C, H, W],
    "y": [b]} of batch_size / world_size images from the union of the training classes, labelled by class
    (data/flat.py); validation and test keep their fixed tasks.
    train_augment: transforms (or their Hydra configs) applied to each training image, uint8 before normalization,
    with draws seeded per image (preprocess.Augment): the flat images, or every support and query image of
    the training tasks; validation and test images never.
    train_on_val: the validation classes join the training classes, for a final run on train+val (as
    Relation Networks' 1,200 training characters and RFS's final runs); the run is then tested with its
    last weights, since validation no longer scores unseen classes.
    The task shapes, small classes and flat training are ClassTaskDataModule's (data/class_tasks.py), shared with text.
    """

    modality = "images"  # what the data feeds the model (an image model refuses text data, and a text model images)

    def __init__(
        self,
        dataset: str,
        root: str | None,
        split: str,
        image_size: int,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        n_way_train: int | None = None,
        k_shot_train: int | None = None,
        k_query_train: int | None = None,
        meta_batch_size: int = 32,
        eval_batch_size: int = 16,
        batches_per_epoch: int = 500,
        n_val_tasks: int = 200,
        n_test_tasks: int = 600,
        seed: int = 0,
        eval_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int | None = None,
        small_classes: str = "error",
        source: Mapping | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str = ".cache",
        download: bool = False,
        train_mode: str = "episodes",
        batch_size: int | None = None,
        within_alphabet: bool = False,
        train_augment: Sequence | None = None,
        train_on_val: bool = False,
    ) -> None:
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset={dataset!r} is not known: use one of {', '.join(DATASETS)}.")
        spec = DATASETS[dataset]
        if split not in spec.splits:
            raise ConfigError(f"data.split={split!r} is not a split of {dataset}: use one of {', '.join(spec.splits)}.")
        if root is None:
            where = "a folder of class folders, or a zip of them" if dataset == "folder" else f"the folder holding {dataset}/"
            raise ConfigError(f"data.root is not set: set data.root=<{where}> (see README, Data).")
        check_whole_number("image_size", image_size, 1)
        n_channels, mean, std = _channels_and_statistics(dataset, spec, channels, mean, std)
        source = plain_dict(source)
        unknown = sorted(set(source) - set(spec.options))
        if unknown:
            known = ", ".join(spec.options) or "none"
            raise ConfigError(f"data.source.{unknown[0]} is not an option of {dataset} (its options: {known}): remove it.")
        if within_alphabet and dataset != "omniglot":
            raise ConfigError(f"data.within_alphabet=true draws tasks within one Omniglot alphabet, but data.dataset={dataset}: remove it.")
        if download and not spec.downloadable:
            raise ConfigError(
                f"data.download=true is not supported for {dataset}: place it under {root} (see README, Data)."
            )
        super().__init__(
            dataset, split, n_way, k_shot, k_query, n_way_train, k_shot_train, k_query_train, meta_batch_size,
            eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed, small_classes, num_workers,
            pin_memory, persistent_workers, train_mode, batch_size, train_on_val,
        )
        self.root, self.image_size = Path(root), image_size
        self.within_alphabet = within_alphabet
        self.mean, self.std, self.channels = mean, std, n_channels
        self.source = source
        self.cache_dir, self.download = Path(cache_dir), download
        transforms = build_transforms(train_augment) if train_augment is not None else []
        self.augment = Augment(transforms, seed) if transforms else None
        self._spec = spec

    def _load(self) -> dict[str, SplitImages]:
        """All three splits, building their caches (and downloading, where allowed) when needed."""
        options = dict(self.source)
        if self._spec.channels is None:
            options["channels"] = self.channels
        return self._spec.load(self.root, self.split, self.image_size, self.cache_dir, self.download, **options)

    def setup(self, stage: str | None = None) -> None:
        """Load all splits (memory-mapped caches) and check the task shapes fit each of them."""
        if self._datasets:
            return
        splits = self._checked_splits(self._load())
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(splits["train"])
            log.info(
                "data.mean=%s data.std=%s, computed from the %d training images: set them in the config to skip this pass.",
                [round(m, 4) for m in self.mean], [round(s, 4) for s in self.std], int(splits["train"].counts.sum()),
            )
        if self.augment is not None:
            train = splits["train"]
            self.augment.check(torch.from_numpy(np.array(train.images[train.starts[0]])), self.dataset)
        self._datasets = self._task_datasets(splits, self.augment, self._alphabets)

    def _alphabets(self, part: str, data: SplitImages, n_way: tuple[str, int]) -> np.ndarray | None:
        """Omniglot's alphabet number of each class when tasks stay within one alphabet (data.within_alphabet), else None.

        DataError when no alphabet of the split has n_way characters.
        """
        if not self.within_alphabet:
            return None
        _, groups = np.unique([name.split("/")[0] for name in data.classes], return_inverse=True)
        (key, ways), largest = n_way, int(np.bincount(groups).max())
        if largest < ways:
            raise DataError(
                f"data.within_alphabet=true draws each task within one alphabet, but no alphabet of the {part} split of "
                f"omniglot ({self.split}) has data.{key}={ways} characters (the largest has {largest}): lower data.{key} "
                "or set data.within_alphabet=false."
            )
        return groups

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [..., C, H, W] -> float32 (x / 255 - mean) / std per channel, on their device."""
        return normalize(images, self.mean, self.std)

    def input_format(self) -> ImageFormat:
        """How this data set's images reach the model (size, channels, inversion, mean/std): what a trained learner applies to new images."""
        if self.mean is None or self.std is None:
            raise RuntimeError("data.mean/std are computed in setup(), or restored by load_state_dict(): call one first")
        return ImageFormat(self.image_size, self.channels, self._spec.invert, tuple(self.mean), tuple(self.std))

    def state_dict(self) -> dict[str, list[float]]:
        """Saved in every checkpoint (Lightning's datamodule state): the normalization the run trained with."""
        return {"mean": list(self.mean), "std": list(self.std)} if self.mean is not None and self.std is not None else {}

    def load_state_dict(self, state_dict: dict[str, list[float]]) -> None:
        """Take a checkpoint's mean/std, so they are not computed again from the training images."""
        if state_dict:
            self.mean, self.std = list(state_dict["mean"]), list(state_dict["std"])

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Convert the uint8 images of a batch, already on the training device, to normalized float32."""
        for key in ("support_x", "query_x", "x"):
            if key in batch and batch[key].dtype == torch.uint8:
                batch[key] = self.normalize(batch[key])
        return batch
