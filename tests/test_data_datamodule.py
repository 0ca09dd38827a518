"""FewShotDataModule on real Omniglot: batches, normalization, bad configs, workers, a Trainer and a resume."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from metalight.data import FewShotDataModule
from metalight.data.images import SplitImages
from metalight.errors import ConfigError, DataError


def _omniglot(data_dir: Path, cache_dir: Path, **overrides) -> FewShotDataModule:
    """A small Omniglot data module: 8 tasks per meta-step, 3 meta-steps per epoch, 20 val/test tasks."""
    kwargs = {
        "dataset": "omniglot", "root": str(data_dir), "split": "vinyals", "image_size": 28, "n_way": 5, "k_shot": 1,
        "k_query": 15, "meta_batch_size": 8, "eval_batch_size": 8, "batches_per_epoch": 3, "n_val_tasks": 20,
        "n_test_tasks": 20, "seed": 3, "eval_seed": 0, "cache_dir": str(cache_dir),
    }
    return FewShotDataModule(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def omniglot(data_dir: Path, cache_dir: Path) -> FewShotDataModule:
    dm = _omniglot(data_dir, cache_dir, mean=[0.5], std=[0.25])
    dm.setup("fit")
    return dm


def test_attributes_and_batches(omniglot: FewShotDataModule) -> None:
    assert (omniglot.channels, omniglot.images_per_class) == (1, 20)
    assert (omniglot.train_classes, omniglot.val_classes, omniglot.test_classes) == (4112, 688, 1692)
    batches = list(omniglot.train_dataloader())
    assert len(batches) == 3
    batch = batches[0]
    assert batch["support_x"].shape == (8, 5, 1, 28, 28) and batch["query_x"].shape == (8, 75, 1, 28, 28)
    assert batch["support_x"].dtype == torch.uint8 and batch["query_y"].dtype == torch.int64
    assert [len(b["support_x"]) for b in omniglot.val_dataloader()] == [8, 8, 4]


@pytest.mark.parametrize(("device", "pinned"), [(None, False), ("cpu", False), ("cuda", True)])
def test_memory_is_pinned_only_for_a_trainer_on_a_gpu(data_dir: Path, cache_dir: Path, device: str | None, pinned: bool) -> None:
    dm = _omniglot(data_dir, cache_dir, pin_memory=True)
    dm.setup("fit")
    if device is not None:  # a CPU run on a machine with a GPU has CUDA available, yet pins nothing
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm.val_dataloader().pin_memory is pinned


def test_normalization_after_transfer(omniglot: FewShotDataModule) -> None:
    batch = next(iter(omniglot.val_dataloader()))
    raw = batch["query_x"].clone()
    out = omniglot.on_after_batch_transfer(batch, 0)
    assert out["query_x"].dtype == torch.float32
    torch.testing.assert_close(out["query_x"], (raw.float() / 255 - 0.5) / 0.25)
    assert out["query_y"].dtype == torch.int64


def test_eval_tasks_identical_for_one_and_two_ranks(omniglot: FewShotDataModule) -> None:
    whole = torch.cat([b["support_x"] for b in omniglot.test_dataloader()])
    try:
        shards = []
        for rank in range(2):
            omniglot.trainer = SimpleNamespace(global_rank=rank, world_size=2)
            shards.append(torch.cat([b["support_x"] for b in omniglot.test_dataloader()]))
    finally:
        omniglot.trainer = None
    assert len(shards[0]) + len(shards[1]) == 20
    assert torch.equal(shards[0], whole[0::2]) and torch.equal(shards[1], whole[1::2])


def test_train_on_val_trains_on_the_validation_classes_too(omniglot: FewShotDataModule, data_dir: Path, cache_dir: Path) -> None:
    joined = _omniglot(data_dir, cache_dir, mean=[0.5], std=[0.25], train_on_val=True)
    joined.setup("fit")
    assert (joined.train_classes, joined.val_classes, joined.test_classes) == (4112 + 688, 688, 1692)
    train, val = joined._datasets["train"], omniglot._datasets["val"]
    last = train.starts[-1]  # the last validation class, now the last training class
    assert train.images[last : last + 20].tobytes() == val.images[val.starts[-1] : val.starts[-1] + 20].tobytes()
    assert joined._datasets["val"].n_classes == 688  # validation itself is unchanged


def test_joined_splits_share_one_array_or_copy_two() -> None:
    images = np.arange(6 * 2).reshape(6, 1, 1, 2).astype(np.uint8)
    first, second = SplitImages.grouped(["a", "b"], images, [2, 4]), SplitImages.grouped(["c"], images[:3] + 100, [3])
    shared = first.joined(SplitImages(["d"], images, np.array([4]), np.array([2])))
    assert shared.images is images and shared.classes == ["a", "b", "d"] and shared.starts.tolist() == [0, 2, 4]
    copied = first.joined(second)
    assert copied.starts.tolist() == [0, 2, 6] and copied.counts.tolist() == [2, 4, 3]
    assert (copied.images[6:9] == images[:3] + 100).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "cifar"}, "data.dataset='cifar' is not known"),
        ({"split": "ravi"}, "data.split='ravi' is not a split of omniglot"),
        ({"n_way": 0}, "data.n_way=0"),
        ({"k_query": -1}, "data.k_query=-1"),
        ({"meta_batch_size": 2.5}, "data.meta_batch_size=2.5"),
        ({"k_shot_train": 0}, "data.k_shot_train=0"),
        ({"n_way_train": 0}, "data.n_way_train=0"),
        ({"k_query_train": 1.5}, "data.k_query_train=1.5"),
        ({"source": {"crop": True}}, "data.source.crop is not an option of omniglot"),
        ({"seed": -1}, "data.seed=-1"),
        ({"mean": [0.5, 0.5, 0.5], "std": [1.0, 1.0, 1.0]}, "1 channel"),
        ({"mean": [0.0], "std": [0.0]}, "positive"),
        ({"std": [0.5]}, "set both"),
        ({"channels": 3}, "data.channels=3"),
        ({"dataset": "miniimagenet", "split": "ravi", "download": True}, "download=true is not supported"),
    ],
)
def test_bad_config(data_dir: Path, cache_dir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _omniglot(data_dir, cache_dir, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_way": 700}, r"n_way=700 .* val split .* 688 classes"),
        ({"k_shot": 6}, r"k_shot=6 \+ data.k_query=15 = 21 .* 20 per class"),
        ({"k_shot_train": 10}, r"k_shot_train=10 \+ data.k_query=15"),
    ],
)
def test_task_shape_must_fit_the_data(data_dir: Path, cache_dir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _omniglot(data_dir, cache_dir, **overrides).setup("fit")


def _fingerprints(loader) -> list[float]:
    return [float(b["support_x"].double().sum() + 3 * b["query_x"].double().sum()) for b in loader]


def test_persistent_workers_match_single_process(omniglot: FewShotDataModule, data_dir: Path, cache_dir: Path) -> None:
    workers = _omniglot(data_dir, cache_dir, num_workers=2, persistent_workers=True, pin_memory=True)
    workers.setup("fit")
    seen = {}
    for name, dm in (("single", omniglot), ("workers", workers)):
        train = dm.train_dataloader()
        seen[name] = [_fingerprints(train)]
        train.sampler.set_epoch(1)  # what Lightning does at each epoch start
        seen[name] += [_fingerprints(train), _fingerprints(dm.val_dataloader())]
    assert seen["single"] == seen["workers"]
    assert seen["single"][0] != seen["single"][1], "another epoch draws other tasks"


class _Recorder(LightningModule):
    """Records a fingerprint of every training batch it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert batch["support_x"].dtype == torch.float32
        self.seen.append((self.current_epoch, batch_idx, float(batch["support_x"].double().sum())))
        return (self.weight * batch["query_x"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: FewShotDataModule, root: Path, ckpt_path: str | None = None, **trainer_kwargs) -> _Recorder:
    module = _Recorder()
    trainer = Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_trainer_sees_each_epochs_tasks(data_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    dm = _omniglot(data_dir, cache_dir, num_workers=2, persistent_workers=True)
    seen = _fit(dm, tmp_path, enable_checkpointing=False).seen
    reference = _omniglot(data_dir, cache_dir)
    reference.setup("fit")
    train = reference.train_dataloader()
    expected = []
    for epoch in range(3):
        train.sampler.set_epoch(epoch)
        for step, batch in enumerate(train):
            batch = reference.on_after_batch_transfer(batch, 0)
            expected.append((epoch, step, float(batch["support_x"].double().sum())))
    assert seen == expected


@pytest.fixture(scope="module")
def full_run(data_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    """An uninterrupted 3-epoch run (3 meta-steps each) with a checkpoint after every step and every epoch."""
    root = tmp_path_factory.mktemp("full_run")
    callbacks = [
        ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=root / "epochs", filename="end-{epoch}", save_on_train_epoch_end=True, save_top_k=-1),
    ]
    return _fit(_omniglot(data_dir, cache_dir), root, callbacks=callbacks).seen, root


@pytest.mark.parametrize(
    ("checkpoint", "done", "workers"),
    [
        ("steps/epoch=1-step=4.ckpt", 4, 0),  # mid-epoch
        ("steps/epoch=0-step=3.ckpt", 3, 2),  # after an epoch's last batch, before the epoch was counted
        ("epochs/end-epoch=0.ckpt", 3, 2),  # at train-epoch end
    ],
)
def test_resume_continues_the_task_stream(
    full_run: tuple, data_dir: Path, cache_dir: Path, tmp_path: Path, checkpoint: str, done: int, workers: int
) -> None:
    seen, root = full_run
    dm = _omniglot(data_dir, cache_dir, num_workers=workers, persistent_workers=workers > 0)
    assert _fit(dm, tmp_path, ckpt_path=str(root / checkpoint)).seen == seen[done:]
