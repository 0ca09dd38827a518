"""Non-episodic training data: minibatches of labelled images from the union of a split's classes (algo=baseline).

The training stream is a sequence of passes over the split's n images, each pass in its own order: sample s
of the run is image `order(p)[s mod n]` of pass p = s // n, where `order(p)` is a permutation drawn from
numpy's default generator seeded with (seed, FLAT_CODE, p). Every pass shows every image exactly once, and
any process can draw any sample without drawing the ones before it. The keys come from the episodes'
TrainTaskSampler, as (epoch, index within the epoch): sample s = epoch * samples_per_epoch + index, so ranks
get distinct slices of each step's batch and a run resumed at a step draws the very same images. With
data.train_augment, sample s is augmented with the draws of (seed, s) (preprocess.Augment): the same in any
process, rank or resumed run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from metalight.tasks.samplers import Key
from metalight.data.preprocess import Augment

FLAT_CODE = 3  # beside episodes.SPLIT_CODES (train 0, val 1, test 2): the flat stream's own generators
TRAIN_MODES = ("episodes", "flat")


class LabelledImages(Dataset):
    """A split's images labelled by class (0..classes-1): dataset[[(epoch, index), ...]] is {"x": [B, C, H, W] uint8, "y": [B]}."""

    def __init__(
        self, images: np.ndarray, starts: np.ndarray, counts: np.ndarray, seed: int, samples_per_epoch: int, augment: Augment | None = None
    ) -> None:
        self.images, self.augment = images, augment
        self.rows = np.concatenate([start + np.arange(count) for start, count in zip(starts, counts)]).astype(np.int64)
        self.labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        self.seed, self.samples_per_epoch = seed, samples_per_epoch
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, pass_index: int) -> np.ndarray:
        """The image order of pass `pass_index` (the last two are kept: a batch spans at most two passes)."""
        if pass_index not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[pass_index] = np.random.default_rng([self.seed, FLAT_CODE, pass_index]).permutation(len(self.rows))
        return self._orders[pass_index]

    def samples(self, keys: Sequence[Key]) -> np.ndarray:
        """The run's sample numbers (epoch * samples_per_epoch + index) of `keys`."""
        return np.array([epoch * self.samples_per_epoch + index for epoch, index in keys], dtype=np.int64)

    def positions(self, keys: Sequence[Key]) -> np.ndarray:
        """Positions (into rows / labels) of the samples `keys` name."""
        samples = self.samples(keys)
        passes, within = np.divmod(samples, len(self.rows))
        return np.array([self.order(int(p))[int(i)] for p, i in zip(passes, within)], dtype=np.int64)

    def __getitem__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        """The images (augmented, with data.train_augment) and labels of the samples `keys` name, in key order."""
        chosen = self.positions(keys)
        images = torch.from_numpy(np.asarray(self.images[self.rows[chosen]]))
        if self.augment is not None:
            images = self.augment(images, [(int(s),) for s in self.samples(keys)])
        return {"x": images, "y": torch.from_numpy(self.labels[chosen])}
