"""data.train_mode=flat: labelled minibatches from the training classes only, every image once per pass, distinct per rank, resumable."""

from pathlib import Path

import numpy as np
import pytest

from metalight.data import FewShotDataModule
from metalight.tasks.samplers import TrainTaskSampler
from metalight.errors import DataError
from synthetic_data import SIZE, write_folder

# 12 classes of 3-5 images, split 6/3/3 by ratios; red = the class's index in sorted order, green = the image's
TREE = {f"class{i:02d}": 3 + i % 3 for i in range(12)}
BATCH, STEPS = 4, 5


def _module(root: Path, cache: Path, **overrides) -> FewShotDataModule:
    """A folder data module trained flat: BATCH images per step, STEPS steps per epoch."""
    kwargs = {
        "dataset": "folder", "root": str(root), "split": "ratios", "image_size": SIZE, "channels": 3, "n_way": 2,
        "k_shot": 1, "k_query": 1, "batches_per_epoch": STEPS, "n_val_tasks": 2, "n_test_tasks": 2, "seed": 3,
        "source": {"ratios": [0.5, 0.25, 0.25], "split_seed": 0}, "cache_dir": str(cache), "train_mode": "flat", "batch_size": BATCH,
    }
    module = FewShotDataModule(**{**kwargs, **overrides})
    module.setup()
    return module


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> FewShotDataModule:
    folder = tmp_path_factory.mktemp("flat")
    return _module(write_folder(folder / "images", TREE), folder / "cache")


def _draw(module: FewShotDataModule, rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0) -> list[dict]:
    """The batches this rank draws in `epoch` from step `start` on."""
    dataset = module._datasets["train"]
    return [dataset[keys] for keys in TrainTaskSampler(BATCH, STEPS, rank, world, epoch, start)]


def _codes(batches: list[dict]) -> list[tuple[int, int]]:
    """(class code, image number) of every image drawn, from its pixels."""
    return [(int(x[0, 0, 0]), int(x[1, 0, 0])) for batch in batches for x in batch["x"]]


def _train_names(module: FewShotDataModule) -> list[str]:
    """The train split's class names in label order (from the cache)."""
    return module._load()["train"].classes


def test_a_pass_shows_every_training_image_once_with_its_class_label(flat: FewShotDataModule) -> None:
    names, train = sorted(TREE), _train_names(flat)
    batches = _draw(flat, epoch=0) + _draw(flat, epoch=1)  # 40 samples: the training images once, then part of the next pass
    drawn, n = _codes(batches), len(flat._datasets["train"])
    assert n == sum(TREE[name] for name in train) and n < len(drawn)
    assert len(set(drawn[:n])) == n, "an image came twice within one pass"
    assert {c for c, _ in drawn[:n]} == {names.index(name) for name in train}, "not every training class"
    assert len(set(drawn[n:])) == len(drawn) - n and drawn[n:] != drawn[: len(drawn) - n], "the next pass repeats the order"
    for batch in batches:
        for x, y in zip(batch["x"], batch["y"]):
            assert names.index(train[int(y)]) == int(x[0, 0, 0]), "label is not the class's row in the train split"


def test_no_validation_or_test_class_is_drawn(flat: FewShotDataModule) -> None:
    names = sorted(TREE)
    held_out = {names.index(name) for part in ("val", "test") for name in flat._load()[part].classes}
    assert len(held_out) == 6
    assert not held_out & {c for c, _ in _codes(_draw(flat, epoch=0) + _draw(flat, epoch=1) + _draw(flat, epoch=2))}


def test_ranks_draw_distinct_images_that_together_are_the_single_process_batches(flat: FewShotDataModule) -> None:
    alone = _draw(flat)
    ranks = [_draw(flat, rank=r, world=2) for r in (0, 1)]
    for step, batch in enumerate(alone):
        halves = [ranks[r][step] for r in (0, 1)]
        assert [len(h["y"]) for h in halves] == [BATCH // 2] * 2
        assert not set(_codes([halves[0]])) & set(_codes([halves[1]])), f"step {step}: both ranks drew one image"
        assert _codes(halves) == _codes([batch]) and np.array_equal(np.concatenate([h["y"] for h in halves]), batch["y"])


def test_a_resumed_stream_draws_the_very_same_images(flat: FewShotDataModule, tmp_path: Path) -> None:
    again = _module(Path(flat.root), tmp_path / "cache")  # a new process: nothing carried over but the cache
    assert _codes(_draw(again, epoch=1, start=2)) == _codes(_draw(flat, epoch=1)[2:])


def test_fewer_than_two_training_classes_stop_naming_the_fix(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "images", {"a": 3, "b": 3, "c": 3})
    for part, names in (("train", ["a"]), ("val", ["b"]), ("test", ["c"])):
        (root / f"{part}.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(DataError, match=r"data.train_mode=flat .* has 1: give it at least 2 classes"):
        _module(root, tmp_path / "cache", split="lists", source={}, n_way=1)
