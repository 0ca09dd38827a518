"""data.train_augment: training images augmented with draws fixed by (seed, sample), the same on any rank, worker or resume; val/test never."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalight.data import FewShotDataModule
from metalight.tasks.samplers import EvalTaskSampler, TrainTaskSampler
from metalight.data.preprocess import Augment, build_transforms
from metalight.errors import ConfigError, DataError
from metalight.runs.training import build_data_and_algorithm
from synthetic_data import SIZE

TREE = {f"class{i:02d}": 3 + i % 3 for i in range(12)}  # as test_data_flat: 6/3/3 classes by ratios
BATCH, STEPS = 4, 5
# RFS's recipe at SIZE pixels
AUGMENT = [
    {"_target_": "torchvision.transforms.v2.RandomCrop", "size": SIZE, "padding": 2},
    {"_target_": "torchvision.transforms.v2.ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
    {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"},
]


def _module(root: Path, cache: Path, **overrides) -> FewShotDataModule:
    """A folder data module trained flat (BATCH images per step, STEPS steps per epoch), augmented unless told."""
    kwargs = {
        "dataset": "folder", "root": str(root), "split": "ratios", "image_size": SIZE, "channels": 3, "n_way": 2,
        "k_shot": 1, "k_query": 1, "batches_per_epoch": STEPS, "n_val_tasks": 4, "n_test_tasks": 4, "seed": 3,
        "source": {"ratios": [0.5, 0.25, 0.25], "split_seed": 0}, "cache_dir": str(cache), "train_mode": "flat",
        "batch_size": BATCH, "train_augment": AUGMENT,
    }
    module = FewShotDataModule(**{**kwargs, **overrides})
    module.setup()
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of TREE's classes of random RGB images (any crop, flip or jitter shows), and its cache."""
    base, rng = tmp_path_factory.mktemp("augment"), np.random.default_rng(0)
    for name, count in TREE.items():
        (base / "images" / name).mkdir(parents=True)
        for j in range(count):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(base / "images" / name / f"{j:03d}.png")
    return base / "images", base / "cache"


@pytest.fixture(scope="module")
def plain(folder) -> FewShotDataModule:
    return _module(*folder, train_augment=None)


@pytest.fixture(scope="module")
def augmented(folder) -> FewShotDataModule:
    return _module(*folder)


def _draw(module: FewShotDataModule, rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0) -> list[dict]:
    """The training batches this rank draws in `epoch` from step `start` on."""
    dataset = module._datasets["train"]
    return [dataset[keys] for keys in TrainTaskSampler(BATCH, STEPS, rank, world, epoch, start)]


def _same(a: list[dict], b: list[dict]) -> bool:
    """Whether two lists of batches hold equal tensors under the same keys."""
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_an_image_key_fixes_its_draws_whatever_the_global_random_state() -> None:
    augment = Augment(build_transforms(AUGMENT), seed=3)
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    torch.manual_seed(0)
    first = augment(images, [(5,), (6,), (7,), (8,)])
    after = torch.random.get_rng_state()
    torch.manual_seed(0)
    assert torch.equal(after, torch.random.get_rng_state()), "augmenting moved the caller's random state"
    torch.manual_seed(1)
    torch.rand(10)
    assert torch.equal(augment(images, [(5,), (6,), (7,), (8,)]), first), "the draws depend on the global random state"
    other = augment(images, [(9,), (10,), (11,), (12,)])
    assert all(not torch.equal(other[j], first[j]) for j in range(4)), "another key drew the same augmentation"
    assert not torch.equal(Augment(augment.transforms, seed=4)(images, [(5,), (6,), (7,), (8,)]), first), "the seed is not used"


def test_an_augmented_batch_keeps_its_shape_dtype_and_labels_but_not_its_pixels(plain, augmented) -> None:
    for step, (before, after) in enumerate(zip(_draw(plain, epoch=1), _draw(augmented, epoch=1))):
        assert after["x"].shape == before["x"].shape and after["x"].dtype == before["x"].dtype == torch.uint8
        assert torch.equal(after["y"], before["y"]), f"step {step}: augmentation changed the labels"
        assert not torch.equal(after["x"], before["x"]), f"step {step}: the batch is not augmented"


def test_the_same_step_is_the_same_batch_twice_and_an_image_seen_again_is_augmented_anew(plain, augmented) -> None:
    assert _same(_draw(augmented, epoch=0), _draw(augmented, epoch=0))
    # the step of the next pass that shows the first image of step 0 again: same pixels before augmentation, other after
    dataset, n = augmented._datasets["train"], len(augmented._datasets["train"])
    first = int(dataset.positions([(0, 0)])[0])
    again = next(s for s in range(n, 2 * n) if int(dataset.positions([(s // (BATCH * STEPS), s % (BATCH * STEPS))])[0]) == first)
    key = [(again // (BATCH * STEPS), again % (BATCH * STEPS))]
    assert torch.equal(plain._datasets["train"][key]["x"], plain._datasets["train"][[(0, 0)]]["x"])
    assert not torch.equal(dataset[key]["x"], dataset[[(0, 0)]]["x"]), "an image seen in a later pass was augmented the same way"


def test_ranks_augment_their_halves_as_one_process_does(augmented) -> None:
    alone = _draw(augmented)
    ranks = [_draw(augmented, rank=r, world=2) for r in (0, 1)]
    for step, batch in enumerate(alone):
        halves = [ranks[r][step] for r in (0, 1)]
        assert torch.equal(torch.cat([h["x"] for h in halves]), batch["x"]), f"step {step}: rank images differ"
        assert torch.equal(torch.cat([h["y"] for h in halves]), batch["y"])


def test_a_resumed_run_and_worker_processes_draw_the_very_same_augmented_batches(augmented, folder, tmp_path: Path) -> None:
    torch.manual_seed(123)  # another process state: nothing carried over but the cache
    again = _module(folder[0], tmp_path / "cache", num_workers=2)
    assert _same(_draw(again, epoch=1, start=2), _draw(augmented, epoch=1)[2:])
    loader = again._loader("train", TrainTaskSampler(BATCH, STEPS, epoch=1, start=2))
    assert _same(list(loader), _draw(augmented, epoch=1)[2:]), "worker processes augmented differently"


def test_validation_and_test_tasks_are_never_augmented(plain, augmented, folder) -> None:
    episodic = {"train_mode": "episodes", "batch_size": None}
    modules = [plain, augmented, _module(*folder, **episodic), _module(*folder, **episodic, train_augment=None)]
    for part in ("val", "test"):
        batches = [[m._datasets[part][keys] for keys in EvalTaskSampler(4, 2)] for m in modules]
        for other in batches[1:]:
            assert _same(other, batches[0]), f"{part} tasks changed with data.train_augment"
    # episodic training (allowed): every support and query image of a training task is augmented, labels kept
    tasks = [m._datasets["train"][[(0, 0), (0, 1)]] for m in modules[2:]]
    for key in ("support_x", "query_x"):
        assert tasks[0][key].shape == tasks[1][key].shape
        assert all(not torch.equal(a, b) for a, b in zip(tasks[0][key].flatten(0, 1), tasks[1][key].flatten(0, 1))), key
    assert torch.equal(tasks[0]["support_y"], tasks[1]["support_y"]) and torch.equal(tasks[0]["query_y"], tasks[1]["query_y"])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"_target_": "torchvision.transforms.v2.RandomCropp", "size": SIZE}, r"data\.train_augment\[1\] \(torchvision\.transforms\.v2\.RandomCropp\) cannot be built: torchvision\.transforms\.v2\.RandomCropp cannot be imported\. Give a transform's class"),
        ({"_target_": "torchvision.transforms.v2.RandomCrop", "sise": SIZE}, r"data\.train_augment\[1\] .* unexpected keyword argument 'sise'"),
        ({"p": 0.5}, r"data\.train_augment\[1\]=\{'p': 0\.5\} is not a transform"),
    ],
)
def test_a_transform_that_cannot_be_built_stops_with_one_line(folder, entry, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _module(*folder, train_augment=[AUGMENT[2], entry])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"_target_": "torchvision.transforms.v2.RandomCrop", "size": 2 * SIZE}, r"data\.train_augment\[0\] \(RandomCrop\) fails on the uint8 \[3, 8, 8\] training images of folder"),
        ({"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": SIZE // 2}, r"data\.train_augment\[0\] \(RandomResizedCrop\) turns .* into torch.uint8 \[3, 4, 4\]: augmentation must keep their size"),
        ({"_target_": "torchvision.transforms.v2.ToDtype", "dtype": {"_target_": "hydra.utils.get_object", "path": "torch.float32"}, "scale": True}, r"into torch\.float32 \[3, 8, 8\].*leave out ToDtype/Normalize"),
    ],
)
def test_a_transform_that_does_not_fit_the_images_stops_with_one_line(folder, entry, message) -> None:
    with pytest.raises(DataError, match=message) as caught:
        _module(*folder, train_augment=[entry])
    assert "\n" not in str(caught.value)


def test_a_run_names_a_bad_transform_before_it_builds_anything(compose_train) -> None:
    cfg = compose_train("experiment=quick_omniglot_baseline", "data.train_augment=[{_target_: torchvision.transforms.v2.Nope}]")
    with pytest.raises(ConfigError, match=r"^data\.train_augment\[0\] \(torchvision\.transforms\.v2\.Nope\) cannot be built"):
        build_data_and_algorithm(cfg)
