"""Samplers that shard a stream of tasks over DDP ranks: each item is a whole meta-batch of (epoch, index) task keys.

Whatever the kind of task (images, regression, ...), task `index` of `epoch` is drawn by its data set as a
pure function of (seed, split, epoch, index); these samplers only decide which keys each rank takes, so
any number of processes, workers and a resumed run draw the same tasks.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

Key = tuple[int, int]


class TrainTaskSampler(Sampler[list[Key]]):
    """This rank's share of each meta-step of an epoch: step g holds tasks [g*B, (g+1)*B), rank r the r-th slice.

    `start` skips the first meta-steps of the epoch it was built for (resuming mid-epoch); later epochs,
    set with set_epoch, start at 0. len() is always `batches_per_epoch`, the count Lightning expects.
    """

    def __init__(
        self,
        meta_batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start: int = 0,
    ) -> None:
        if meta_batch_size % world_size:
            raise ValueError(f"meta_batch_size={meta_batch_size} is not a multiple of world_size={world_size}")
        self.share = meta_batch_size // world_size
        self.meta_batch_size, self.batches_per_epoch = meta_batch_size, batches_per_epoch
        self.rank, self.epoch, self.start = rank, epoch, start

    def set_epoch(self, epoch: int) -> None:
        """Draw the tasks of `epoch` from now on (called by Lightning at each epoch start)."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[list[Key]]:
        epoch = self.epoch
        for step in range(self.start, self.batches_per_epoch):
            first = step * self.meta_batch_size + self.rank * self.share
            yield [(epoch, i) for i in range(first, first + self.share)]

    def __len__(self) -> int:
        return self.batches_per_epoch


class EvalTaskSampler(Sampler[list[Key]]):
    """The fixed tasks 0..n_tasks-1 of this rank (index ≡ rank mod world_size), in chunks of batch_size."""

    def __init__(self, n_tasks: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n_tasks, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[Key]]:
        for first in range(0, len(self.indices), self.batch_size):
            yield [(0, i) for i in self.indices[first : first + self.batch_size]]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)
