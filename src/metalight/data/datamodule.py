"""FewShotDataModule: Omniglot or miniImageNet as deterministic, rank-sharded meta-batches of few-shot tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from metalight.data import miniimagenet, omniglot
from metalight.data.episodes import EpisodeDataset, EvalTaskSampler, TrainTaskSampler
from metalight.data.images import SplitImages
from metalight.errors import ConfigError, DataError


@dataclass(frozen=True)
class _DatasetSpec:
    """How to load one data set and what its images look like."""

    load: Callable[..., dict[str, SplitImages]]
    splits: tuple[str, ...]
    channels: int
    downloadable: bool


DATASETS = {
    "omniglot": _DatasetSpec(omniglot.load_omniglot, omniglot.SPLITS, channels=1, downloadable=True),
    "miniimagenet": _DatasetSpec(miniimagenet.load_miniimagenet, miniimagenet.SPLITS, channels=3, downloadable=False),
}


def _check_int(name: str, value: object, smallest: int) -> None:
    """ConfigError unless value is an int >= smallest."""
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise ConfigError(
            f"data.{name}={value!r} is not valid: it must be a whole number >= {smallest}, "
            f"e.g. data.{name}={max(smallest, 1)}."
        )


class FewShotDataModule(LightningDataModule):
    """Meta-batches of few-shot tasks (uint8 on the host, normalized float32 on the device) for MAML-style training.

    Batches are dicts: support_x [B, N*K, C, H, W], support_y [B, N*K], query_x [B, N*Q, C, H, W],
    query_y [B, N*Q], B = meta_batch_size / world_size tasks for training, up to eval_batch_size for val/test.
    Training task i of epoch e is a function of (seed, "train", e, i); the val/test tasks are the fixed sets
    0..n-1 of (eval_seed, split, 0, i), dealt to ranks round-robin. After setup(): `channels`,
    `images_per_class` and `train_classes`, `val_classes`, `test_classes` (class counts).
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        split: str,
        image_size: int,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        k_shot_train: int | None = None,
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
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str = ".cache",
        download: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset={dataset!r} is not known: use one of {', '.join(DATASETS)}.")
        spec = DATASETS[dataset]
        if split not in spec.splits:
            raise ConfigError(f"data.split={split!r} is not a split of {dataset}: use one of {', '.join(spec.splits)}.")
        k_shot_train = k_shot if k_shot_train is None else k_shot_train
        positive = dict(
            image_size=image_size, n_way=n_way, k_shot=k_shot, k_query=k_query, k_shot_train=k_shot_train,
            meta_batch_size=meta_batch_size, eval_batch_size=eval_batch_size, batches_per_epoch=batches_per_epoch,
            n_val_tasks=n_val_tasks, n_test_tasks=n_test_tasks,
        )
        for name, value in positive.items():
            _check_int(name, value, 1)
        for name, value in (("seed", seed), ("eval_seed", eval_seed), ("num_workers", num_workers)):
            _check_int(name, value, 0)
        if channels is not None and channels != spec.channels:
            raise ConfigError(
                f"data.channels={channels} but {dataset} images have {spec.channels} channel(s): "
                f"set data.channels={spec.channels}."
            )
        mean = [0.0] * spec.channels if mean is None else [float(m) for m in mean]
        std = [1.0] * spec.channels if std is None else [float(s) for s in std]
        if len(mean) != spec.channels or len(std) != spec.channels:
            raise ConfigError(
                f"data.mean={mean} / data.std={std}: {dataset} has {spec.channels} channel(s), so each needs "
                f"{spec.channels} value(s)."
            )
        if min(std) <= 0:
            raise ConfigError(f"data.std={std} must be positive in every channel.")
        if download and not spec.downloadable:
            raise ConfigError(
                f"data.download=true is not supported for {dataset}: place it under {root} (see README, Data)."
            )
        self.dataset, self.root, self.split, self.image_size = dataset, Path(root), split, image_size
        self.n_way, self.k_shot, self.k_query, self.k_shot_train = n_way, k_shot, k_query, k_shot_train
        self.meta_batch_size, self.eval_batch_size = meta_batch_size, eval_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.n_val_tasks, self.n_test_tasks, self.seed, self.eval_seed = n_val_tasks, n_test_tasks, seed, eval_seed
        self.mean, self.std, self.channels = mean, std, spec.channels
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        self.cache_dir, self.download = Path(cache_dir), download
        self.images_per_class = self.train_classes = self.val_classes = self.test_classes = 0
        self._spec = spec
        self._datasets: dict[str, EpisodeDataset] = {}
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _load(self) -> dict[str, SplitImages]:
        """All three splits, building their caches (and downloading Omniglot) when needed."""
        return self._spec.load(self.root, self.split, self.image_size, self.cache_dir, self.download)

    def prepare_data(self) -> None:
        """Download (Omniglot, if allowed) and decode every split into the cache once, on one process per node."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        """Load all splits (memory-mapped caches) and check the task shape fits each of them."""
        if self._datasets:
            return
        splits = self._load()
        for part, data in splits.items():
            n_classes, per_class = data.images.shape[:2]
            if self.n_way > n_classes:
                raise DataError(
                    f"data.n_way={self.n_way} but the {part} split of {self.dataset} ({self.split}) has only "
                    f"{n_classes} classes: lower data.n_way to at most {n_classes}."
                )
            for name, shots in (("k_shot", self.k_shot), ("k_shot_train", self.k_shot_train)):
                if shots + self.k_query > per_class:
                    raise DataError(
                        f"data.{name}={shots} + data.k_query={self.k_query} = {shots + self.k_query} images per "
                        f"class, but {self.dataset} has {per_class} per class: lower them to sum to at most "
                        f"{per_class}."
                    )
        self.images_per_class = splits["train"].images.shape[1]
        parts = ("train", "val", "test")
        self.train_classes, self.val_classes, self.test_classes = (len(splits[p].classes) for p in parts)
        self._datasets = {
            part: EpisodeDataset(
                splits[part].images,
                part,
                self.seed if part == "train" else self.eval_seed,
                self.n_way,
                self.k_shot_train if part == "train" else self.k_shot,
                self.k_query,
            )
            for part in parts
        }

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer, (0, 1) without one."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, first meta-step) where training continues: (0, 0), or where a restored trainer resumes.

        Read when Lightning requests the train loader, after it restored the loops from a checkpoint but
        before it resets them; with workers the first batches are prefetched right then, so the position
        must already be the one Lightning will run. Checked against Lightning 2.6 for checkpoints saved on
        train-batch end (mid-epoch and on an epoch's last batch), on train-epoch end and on validation end.
        """
        if self.trainer is None:
            return 0, 0
        loop = self.trainer.fit_loop
        epoch, batches = loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress
        if not loop.restarting:  # fresh start, or a checkpoint taken after the epoch was counted as processed
            return epoch, 0
        if batches.is_last_batch:  # saved after the last batch of `epoch`: Lightning goes on with the next one
            return epoch + 1, 0
        return epoch, batches.current.processed

    def _loader(self, part: str, sampler: Sampler) -> DataLoader:
        """A DataLoader whose sampler yields whole meta-batches of task keys (hence batch_size=None)."""
        if not self._datasets:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            self._datasets[part],
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning only helps a GPU copy
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's share of batches_per_epoch meta-batches of training tasks, for the current epoch."""
        rank, world = self._rank_world()
        if self.meta_batch_size % world:
            raise ConfigError(
                f"data.meta_batch_size={self.meta_batch_size} does not split evenly over {world} processes: "
                f"choose a multiple of {world}."
            )
        epoch, start = self._resume_position()
        sampler = TrainTaskSampler(self.meta_batch_size, self.batches_per_epoch, rank, world, epoch, start)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        """This rank's part of the fixed n_val_tasks validation tasks."""
        return self._loader("val", EvalTaskSampler(self.n_val_tasks, self.eval_batch_size, *self._rank_world()))

    def test_dataloader(self) -> DataLoader:
        """This rank's part of the fixed n_test_tasks test tasks."""
        return self._loader("test", EvalTaskSampler(self.n_test_tasks, self.eval_batch_size, *self._rank_world()))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [..., C, H, W] -> float32 (x / 255 - mean) / std per channel, on their device."""
        if images.device not in self._affine:
            mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
            std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
            self._affine[images.device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._affine[images.device]
        return images.float().mul_(scale).sub_(shift)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Convert the uint8 images of a batch, already on the training device, to normalized float32."""
        for key in ("support_x", "query_x"):
            if batch[key].dtype == torch.uint8:
                batch[key] = self.normalize(batch[key])
        return batch
