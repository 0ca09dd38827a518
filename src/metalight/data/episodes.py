"""Few-shot image tasks drawn deterministically from a uint8 split (tasks/samplers.py shards them over ranks).

Task `index` of `epoch` is a pure function of (seed, split, epoch, index): its random generator is
numpy's default (PCG64) seeded with the SeedSequence of those four integers, so any process can draw
any task without drawing the ones before it. A task picks n_way classes without replacement and, in
each, k_shot + k_query distinct images (the first k_shot form the support set); labels are the
position of the class in the task, 0..n_way-1, class-major (support_y = [0]*k_shot + [1]*k_shot + ...).

Classes may hold different numbers of images. The images of the chosen classes are drawn with one
uniform key per (way, position) over the largest class of the split, keys past a class's own count set
to +inf, and the k_shot + k_query smallest kept: when every class has the same count this is exactly
the draw of a dense [classes, per_class] split (Omniglot's and miniImageNet's tasks did not change).

The DataLoader gets one of the samplers of tasks/samplers.py as `sampler` with `batch_size=None`: each item the
sampler yields is a whole meta-batch, a list of (epoch, index) keys, and EpisodeDataset turns it into
stacked tensors with two advanced-indexing gathers. The epoch travels inside the keys, so worker
processes (persistent or not) need no epoch state of their own; Lightning calls `set_epoch` on
`DataLoader.sampler` at the start of every training epoch.

With data.train_augment the training tasks' images are augmented (preprocess.Augment), image j of task
(epoch, index) with the draws of (seed, epoch, index, j), j counting the support images then the queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metalight.data.preprocess import Augment
from metalight.tasks.samplers import Key

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class EpisodeDataset(Dataset):
    """A split as few-shot tasks: dataset[[(epoch, index), ...]] is the meta-batch of those tasks.

    `images` is either [classes, per_class, C, H, W] (every class the same count) or [n_images, C, H, W]
    with `starts` and `counts`: class c is images[starts[c] : starts[c] + counts[c]]. With `groups` (a group
    number per class, e.g. Omniglot's alphabets) a task first draws one of the groups holding at least
    n_way classes, uniformly, then its classes within that group; without, tasks are drawn as before.
    `augment` (training tasks with data.train_augment) augments every support and query image.
    """

    def __init__(
        self,
        images: np.ndarray,
        split: str,
        seed: int,
        n_way: int,
        k_shot: int,
        k_query: int,
        starts: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        augment: Augment | None = None,
    ) -> None:
        self.augment = augment
        if starts is None or counts is None:
            n_classes, per_class = images.shape[:2]
            images = images.reshape(n_classes * per_class, *images.shape[2:])
            starts = np.arange(n_classes, dtype=np.int64) * per_class
            counts = np.full(n_classes, per_class, dtype=np.int64)
        self.images = images
        self.starts, self.counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        self.split, self.seed = split, seed
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.n_classes, self.per_class = len(self.counts), int(self.counts.max(initial=0))
        self.ragged = bool(len(self.counts)) and int(self.counts.min()) != self.per_class
        if len(self.counts) < n_way or (len(self.counts) and int(self.counts.min()) < k_shot + k_query):
            raise ValueError(
                f"{split}: {len(self.counts)} classes (smallest {self.counts.min(initial=0)} images) cannot "
                f"give {n_way}-way tasks of {k_shot} + {k_query} images per class"
            )
        self.members = None if groups is None else [c for c in (np.flatnonzero(groups == g) for g in np.unique(groups)) if len(c) >= n_way]
        if self.members is not None and not self.members:
            raise ValueError(f"{split}: no group holds {n_way} classes")
        self._support_y = torch.arange(n_way).repeat_interleave(k_shot)
        self._query_y = torch.arange(n_way).repeat_interleave(k_query)

    def choose(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Class rows [n_way] and image positions within each class [n_way, k_shot + k_query] of task `index` of `epoch`."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], epoch, index])
        if self.members is None:
            classes = rng.choice(self.n_classes, self.n_way, replace=False)
        else:
            group = self.members[rng.integers(len(self.members))]
            classes = group[rng.choice(len(group), self.n_way, replace=False)]
        # the k_shot + k_query smallest of iid uniform keys: a uniformly random ordered sample per class
        keys = rng.random((self.n_way, self.per_class))
        if self.ragged:  # positions past a class's own count can never be among the smallest
            keys[np.arange(self.per_class) >= self.counts[classes][:, None]] = np.inf
        samples = keys.argsort(axis=1)[:, : self.k_shot + self.k_query]
        return classes, samples

    def __getitem__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        """support_x [B, N*K, C, H, W] uint8, support_y [B, N*K] int64, query_x, query_y for B keys."""
        chosen = [self.choose(epoch, index) for epoch, index in keys]
        classes = np.stack([c for c, _ in chosen])
        rows = self.starts[classes][:, :, None] + np.stack([s for _, s in chosen])  # [B, n_way, k_shot + k_query]
        shape = self.images.shape[1:]
        batch = len(keys)
        support = self.images[rows[:, :, : self.k_shot]].reshape(batch, -1, *shape)
        query = self.images[rows[:, :, self.k_shot :]].reshape(batch, -1, *shape)
        support, query = torch.from_numpy(np.asarray(support)), torch.from_numpy(np.asarray(query))
        if self.augment is not None:
            support, query = self._augmented(keys, support, query)
        return {
            "support_x": support,
            "support_y": self._support_y.expand(batch, -1).clone(),
            "query_x": query,
            "query_y": self._query_y.expand(batch, -1).clone(),
        }

    def _augmented(self, keys: Sequence[Key], support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """support [B, S, ...] and query [B, Q, ...] augmented: image j of task (epoch, index), support first, with key (epoch, index, j)."""
        both = torch.cat([support, query], dim=1)
        positions = range(both.shape[1])
        names = [(epoch, index, j) for epoch, index in keys for j in positions]
        both = self.augment(both.flatten(0, 1), names).view(both.shape)  # type: ignore[misc]
        return both[:, : support.shape[1]], both[:, support.shape[1] :]

    def __getstate__(self) -> dict:
        """Pickle a memory-mapped split by its file name, not its contents (spawned workers reopen it)."""
        state = self.__dict__.copy()
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = (Path(self.images.filename), self.images.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        """Reopen a memory-mapped split pickled by __getstate__ (viewed flat, as it was)."""
        if isinstance(state["images"], tuple):
            path, shape = state["images"]
            state["images"] = np.load(path, mmap_mode="r").reshape(shape)
        self.__dict__.update(state)
