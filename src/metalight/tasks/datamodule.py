"""TaskDataModule: what every data module of tasks shares, whatever its kind: rank-sharded meta-batches, fixed eval tasks, exact resume."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from metalight.errors import ConfigError
from metalight.tasks.kinds import CLASSIFICATION, TaskKind
from metalight.tasks.samplers import EvalTaskSampler, TrainTaskSampler


def plain_dict(node: object) -> dict:
    """A config node (DictConfig or dict, or None) as a plain dict."""
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node)  # type: ignore[arg-type]


def check_whole_number(name: str, value: object, smallest: int) -> None:
    """ConfigError naming data.<name> unless value is an int >= smallest."""
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise ConfigError(
            f"data.{name}={value!r} is not valid: it must be a whole number >= {smallest}, "
            f"e.g. data.{name}={max(smallest, 1)}."
        )


class TaskDataModule(LightningDataModule):
    """Base of the data modules: a subclass fills `_datasets` ("train", "val", "test": datasets indexed by lists of task keys).

    Training task i of epoch e is its dataset's function of (seed, "train", e, i); the meta-batch of a
    step is split over ranks (TrainTaskSampler). Validation and test are the fixed tasks 0..n-1 of
    eval_seed, dealt to ranks round-robin (EvalTaskSampler). `kind` is the task interface the learner
    reads its loss and metric from. The settings every task stream has are checked here (one line naming data.<key>);
    a subclass checks its own.
    """

    kind: TaskKind = CLASSIFICATION

    def __init__(
        self,
        meta_batch_size: int,
        eval_batch_size: int,
        batches_per_epoch: int,
        n_val_tasks: int,
        n_test_tasks: int,
        seed: int,
        eval_seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        for key, value, smallest in (
            ("meta_batch_size", meta_batch_size, 1), ("eval_batch_size", eval_batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1),
            ("n_val_tasks", n_val_tasks, 1), ("n_test_tasks", n_test_tasks, 1), ("seed", seed, 0), ("eval_seed", eval_seed, 0), ("num_workers", num_workers, 0),
        ):
            check_whole_number(key, value, smallest)
        self.meta_batch_size, self.eval_batch_size, self.batches_per_epoch = meta_batch_size, eval_batch_size, batches_per_epoch
        self.n_val_tasks, self.n_test_tasks, self.seed, self.eval_seed = n_val_tasks, n_test_tasks, seed, eval_seed
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        self._datasets: dict[str, Dataset] = {}

    def train_batch(self) -> tuple[str, int]:
        """(config key, items per training step summed over ranks): the meta-batch size, unless a subclass trains on other items."""
        return "meta_batch_size", self.meta_batch_size

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer, (0, 1) without one."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _trains_on_cuda(self) -> bool:
        """Whether the attached trainer's device is a GPU (a CPU run on a machine with one pins nothing)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

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
            pin_memory=self.pin_memory and self._trains_on_cuda(),  # pinning only helps a copy to the GPU
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's share of batches_per_epoch training batches, for the current epoch (from where a resumed run stopped)."""
        rank, world = self._rank_world()
        key, per_step = self.train_batch()
        if per_step % world:
            raise ConfigError(
                f"data.{key}={per_step} does not split evenly over {world} processes: choose a multiple of {world}."
            )
        epoch, start = self._resume_position()
        sampler = TrainTaskSampler(per_step, self.batches_per_epoch, rank, world, epoch, start)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        """This rank's part of the fixed n_val_tasks validation tasks."""
        return self._loader("val", EvalTaskSampler(self.n_val_tasks, self.eval_batch_size, *self._rank_world()))

    def test_dataloader(self) -> DataLoader:
        """This rank's part of the fixed n_test_tasks test tasks."""
        return self._loader("test", EvalTaskSampler(self.n_test_tasks, self.eval_batch_size, *self._rank_world()))
