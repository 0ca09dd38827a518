"""data=folder: class folders or a zip, list and ratio splits, small classes, bad input, and Omniglot's Lake split as folders."""

import logging
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metalight.data import FewShotDataModule
from metalight.data.folder import list_classes, load_folder, ratio_split
from metalight.data.omniglot import LAKE_VAL_ALPHABETS
from metalight.errors import ConfigError, DataError
from synthetic_data import SIZE, write_folder, zip_folder

RATIOS = {"ratios": [0.5, 0.25, 0.25], "split_seed": 0}
TREE = {f"{group}/class{i}": 3 + i % 3 for group in ("animals", "plants") for i in range(6)}  # 12 classes, 3-5 images


def _module(where: Path, cache: Path, **overrides) -> FewShotDataModule:
    """A small folder data module on `where`: 2-way 1-shot 1-query tasks, 2 per meta-step, 4 val/test tasks."""
    kwargs = {
        "dataset": "folder", "root": str(where), "split": "auto", "image_size": SIZE, "channels": 3, "n_way": 2,
        "k_shot": 1, "k_query": 1, "meta_batch_size": 2, "eval_batch_size": 2, "batches_per_epoch": 2,
        "n_val_tasks": 4, "n_test_tasks": 4, "seed": 1, "source": RATIOS, "cache_dir": str(cache),
    }
    return FewShotDataModule(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tree") / "images", TREE)


def test_classes_are_image_folders_named_by_path(tree: Path, tmp_path: Path) -> None:
    classes, _ = list_classes(tree)
    assert list(classes) == sorted(TREE) and [len(r) for r in classes.values()] == [TREE[n] for n in sorted(TREE)]
    folder = load_folder(tree, "ratios", SIZE, tmp_path / "cache", channels=3, **RATIOS)
    for archive, top in (("flat.zip", None), ("folder.zip", "images")):  # a zip, with or without a top folder
        zipped = load_folder(zip_folder(tree, tmp_path / archive, top), "ratios", SIZE, tmp_path / "cache", channels=3, **RATIOS)
        for part in ("train", "val", "test"):
            assert zipped[part].classes == folder[part].classes
            rows = [np.asarray(s.images[s.starts[c] : s.starts[c] + s.counts[c]]) for s in (zipped[part], folder[part]) for c in range(len(s.classes))]
            half = len(rows) // 2
            assert all(np.array_equal(a, b) for a, b in zip(rows[:half], rows[half:]))
    train = folder["train"]
    code = sorted(TREE).index(train.classes[0])
    first = train.images[train.starts[0] : train.starts[0] + train.counts[0]]
    assert first.shape == (TREE[train.classes[0]], 3, SIZE, SIZE) and (first[:, 0] == code).all()
    assert first[:, 1, 0, 0].tolist() == list(range(len(first))), "images in file-name order"


def test_ratio_split_is_fixed_by_its_seed() -> None:
    names = [f"c{i:02d}" for i in range(20)]
    split = ratio_split(names, [0.6, 0.2, 0.2], 0)
    assert [len(split[p]) for p in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(sum(split.values(), [])) == names, "every class once"
    assert ratio_split(list(reversed(names)), [0.6, 0.2, 0.2], 0) == split, "independent of listing order"
    assert ratio_split(names, [0.6, 0.2, 0.2], 1) != split


def test_ratio_split_tasks_are_the_same_for_any_world_size(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="metalight"):
        single = _module(tree, tmp_path)
        single.setup()
    assert "split by data.source.ratios=[0.5, 0.25, 0.25] with data.source.split_seed=0 into 6/3/3" in caplog.text
    again = _module(tree, tmp_path)
    again.setup()
    whole = torch.cat([b["query_x"] for b in single.test_dataloader()])
    assert torch.equal(whole, torch.cat([b["query_x"] for b in again.test_dataloader()])), "same tasks on every run"
    wide = _module(tree, tmp_path, meta_batch_size=4)
    wide.setup()
    first_step = next(iter(wide.train_dataloader()))["support_x"]
    for world in (2, 4):
        test_shards, train_shards = [], []
        for rank in range(world):
            module = _module(tree, tmp_path, meta_batch_size=4)
            module.setup()
            module.trainer = SimpleNamespace(global_rank=rank, world_size=world, fit_loop=None)
            module._resume_position = lambda: (0, 0)  # no fit loop in this test
            test_shards.append(torch.cat([b["query_x"] for b in module.test_dataloader()]))
            train_shards.append(next(iter(module.train_dataloader()))["support_x"])
        assert all(torch.equal(test_shards[r], whole[r::world]) for r in range(world)), "eval tasks dealt round-robin"
        assert torch.equal(torch.cat(train_shards), first_step), "ranks split each meta-step, no overlap"


def _lists(directory: Path, parts: dict[str, list[str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for part, names in parts.items():
        (directory / f"{part}.txt").write_text("# my split\n" + "\n".join(names) + "\n")
    return directory


GOOD_LISTS = {"train": sorted(TREE)[:6], "val": sorted(TREE)[6:9], "test": sorted(TREE)[9:]}


def test_class_lists(tree: Path, tmp_path: Path) -> None:
    lists = _lists(tmp_path / "lists", GOOD_LISTS)
    parts = load_folder(tree, "auto", SIZE, tmp_path / "cache", channels=3, lists=str(lists), **RATIOS)
    assert {p: s.classes for p, s in parts.items()} == GOOD_LISTS
    ratio = load_folder(tree, "ratios", SIZE, tmp_path / "cache", channels=3, lists=str(lists), **RATIOS)
    assert ratio["train"].classes != GOOD_LISTS["train"], "split=ratios ignores the lists"
    assert Path(ratio["train"].images.filename) == Path(parts["train"].images.filename), "one cache for any split"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({**GOOD_LISTS, "val": ["animals/class9"]}, r"val.txt:2: class 'animals/class9' is not a class folder under .*like 'animals/class0'"),
        ({**GOOD_LISTS, "test": GOOD_LISTS["test"] + ["animals/class0"]}, r"'animals/class0' is in both the train and the test list"),
        ({**GOOD_LISTS, "val": ["plants/class0", "plants/class0"]}, r"val.txt:3: class 'plants/class0' is listed twice"),
        ({"train": GOOD_LISTS["train"]}, r"class lists incomplete in .*: val.txt, test.txt missing"),
    ],
)
def test_bad_class_lists(tree: Path, tmp_path: Path, parts: dict, message: str) -> None:
    lists = _lists(tmp_path / "lists", parts)
    with pytest.raises(DataError, match=message):
        load_folder(tree, "auto", SIZE, tmp_path / "cache", channels=3, lists=str(lists), **RATIOS)


def _broken(kind: str, root: Path) -> Path:
    """A folder tree with one kind of defect."""
    if kind == "empty":
        (root / "docs").mkdir(parents=True)
        (root / "docs" / "README.txt").write_text("no images here")
    elif kind == "not_a_folder":
        root = root.with_suffix(".tar")
    elif kind == "loose_images":
        write_folder(root, {"a": 3, "b": 3})
        (root / "stray.png").write_bytes((root / "a" / "000.png").read_bytes())
    elif kind == "nested_class":
        write_folder(root, {"a": 3, "a/b": 3, "c": 3})
    elif kind == "mixed_modes":
        write_folder(root, {"a": 3, "b": 3, "c": 3}, grey={"b"})
    elif kind == "corrupt":
        write_folder(root, {"a": 3, "b": 3, "c": 3})
        (root / "b" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", r"no class folders with images under .*<root>/<class>/<image>"),
        ("not_a_folder", r"data.root=.* is neither a folder nor a .zip file"),
        ("loose_images", r"holds images directly \(.*stray.png\): every image must sit in a class folder"),
        ("nested_class", r"class folder 'a' .* holds images and also the class folder 'a/b'"),
        ("mixed_modes", r"images of mixed modes: .*a/000.png is colour \(PIL mode RGB\) but .*b/000.png is grey \(mode L\).*mixed_modes=convert"),
        ("corrupt", r"cannot read image .*b/001.png"),
    ],
)
def test_bad_trees(kind: str, message: str, tmp_path: Path) -> None:
    root = _broken(kind, tmp_path / "images")
    with pytest.raises(DataError, match=message):
        load_folder(root, "auto", SIZE, tmp_path / "cache", channels=3, ratios=[0.34, 0.33, 0.33], split_seed=0)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "no partial cache"


def test_mixed_modes_convert(tmp_path: Path) -> None:
    root = _broken("mixed_modes", tmp_path / "images")
    parts = load_folder(root, "ratios", SIZE, tmp_path / "cache", channels=1, ratios=[0.34, 0.33, 0.33], split_seed=0, mixed_modes="convert")
    assert parts["train"].images.shape[1:] == (1, SIZE, SIZE)


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        ({"ratios": [0.5, 0.3, 0.3]}, ConfigError, r"data.source.ratios=\[0.5, 0.3, 0.3\] is not valid: .*sum to 1"),
        ({"ratios": [0.5, 0.5]}, ConfigError, r"data.source.ratios=\[0.5, 0.5\] is not valid"),
        ({"ratios": [1.0, 0.0, 0.0]}, DataError, r"leaves the val split without a class"),
        ({"split_seed": -1}, ConfigError, r"data.source.split_seed=-1"),
        ({"mixed_modes": "maybe"}, ConfigError, r"data.source.mixed_modes='maybe'"),
        ({"crop": True}, ConfigError, r"data.source.crop is not an option of folder"),
    ],
)
def test_bad_source_options(tree: Path, tmp_path: Path, source: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _module(tree, tmp_path, source={**RATIOS, **source}).setup()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"root": None}, ConfigError, r"data.root is not set: set data.root=<a folder of class folders, or a zip of them>"),
        ({"channels": 2}, ConfigError, r"data.channels=2: folder images are read as 1 \(grey\) or 3"),
        ({"small_classes": "keep"}, ConfigError, r"data.small_classes='keep'"),
        ({"n_way": 4}, DataError, r"data.n_way=4 but the val split of folder \(auto\) has only 3 classes"),
        ({"n_way_train": 7}, DataError, r"data.n_way_train=7 but the train split of folder \(auto\) has only 6 classes"),
    ],
)
def test_bad_task_shapes(tree: Path, tmp_path: Path, overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _module(tree, tmp_path, **overrides).setup()


def test_small_classes_are_reported_then_refused_or_dropped(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # classes hold 3 to 5 images; 1 shot + 3 queries needs 4
    source = {**RATIOS, "split_seed": 1}  # a seed that leaves small and large classes in every part
    split = ratio_split(sorted(TREE), source["ratios"], 1)
    small = {part: [n for n in names if TREE[n] < 4] for part, names in split.items()}
    assert all(0 < len(small[p]) < len(split[p]) for p in small), "each part has small and large classes"
    listed = ", ".join(rf"'{n}' \(3\)" for n in small["train"])
    with pytest.raises(DataError, match=rf"data.k_shot=1 \+ data.k_query=3 = 4 images per class, but {len(small['train'])} of the 6 classes of the train split of folder hold fewer: {listed}\. .*data.small_classes=drop"):
        _module(tree, tmp_path, source=source, k_query=3, n_way=1).setup()
    with caplog.at_level(logging.WARNING, logger="metalight"):
        dropped = _module(tree, tmp_path, source=source, k_query=3, n_way=1, small_classes="drop")
        dropped.setup()
    assert f"{len(small['train'])} of the 6 classes of the train split of folder hold fewer" in caplog.text and "left out" in caplog.text
    assert dropped.train_classes == 6 - len(small["train"]) and dropped.images_per_class == 4 and dropped.max_images_per_class == 5
    kept = len(split["val"]) - len(small["val"])
    with pytest.raises(DataError, match=rf"data.n_way={kept + 1} but the val split .* only {kept} classes once the {len(small['val'])} with too few images are left out"):
        _module(tree, tmp_path, source=source, k_query=3, n_way=kept + 1, small_classes="drop").setup()


def test_training_tasks_may_have_their_own_way_shot_and_query(tree: Path, tmp_path: Path) -> None:
    module = _module(tree, tmp_path, n_way_train=3, k_shot_train=2, k_query_train=1, k_query=2)
    module.setup()
    train, test = next(iter(module.train_dataloader())), next(iter(module.test_dataloader()))
    assert train["support_x"].shape == (2, 6, 3, SIZE, SIZE) and train["query_x"].shape == (2, 3, 3, SIZE, SIZE)
    assert train["support_y"][0].tolist() == [0, 0, 1, 1, 2, 2]
    assert test["support_x"].shape == (2, 2, 3, SIZE, SIZE) and test["query_x"].shape == (2, 4, 3, SIZE, SIZE)
    with pytest.raises(DataError, match=r"data.k_shot_train=4 \+ data.k_query_train=2 = 6 .* at most 5 per class"):
        _module(tree, tmp_path, k_shot_train=4, k_query_train=2).setup()


def test_mean_and_std_from_the_training_images(tree: Path, tmp_path: Path) -> None:
    module = _module(tree, tmp_path, mean=None, std=None)
    module.setup()
    train = module._datasets["train"]
    pixels = np.concatenate([train.images[s : s + c] for s, c in zip(train.starts, train.counts)]).astype(np.float64) / 255
    np.testing.assert_allclose(module.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(module.std, np.maximum(pixels.std(axis=(0, 2, 3)), 1e-6 / 255), atol=1e-9)


def _lake_subset(data_dir: Path, root: Path) -> dict[str, list[str]]:
    """A few real characters per Lake part, as Omniglot's layout (zips) and as one zip of class folders plus class lists."""
    picks = {
        "images_background": ["Latin/character01", "Latin/character02", "Latin/character03", f"{LAKE_VAL_ALPHABETS[0]}/character01", f"{LAKE_VAL_ALPHABETS[1]}/character02"],
        "images_evaluation": ["Angelic/character01", "Angelic/character02"],
    }
    (root / "omniglot").mkdir(parents=True)
    with zipfile.ZipFile(root / "mine.zip", "w") as mine:
        for archive, characters in picks.items():
            with zipfile.ZipFile(data_dir / "omniglot" / f"{archive}.zip") as src, zipfile.ZipFile(root / "omniglot" / f"{archive}.zip", "w") as dst:
                for name in src.namelist():
                    if any(name.startswith(f"{archive}/{c}/") for c in characters) and name.endswith(".png"):
                        dst.writestr(name, src.read(name))
                        mine.writestr(name, src.read(name))
    background = [f"images_background/{c}" for c in picks["images_background"]]
    return {
        "train": [c for c in background if c.split("/")[1] not in LAKE_VAL_ALPHABETS],
        "val": [c for c in background if c.split("/")[1] in LAKE_VAL_ALPHABETS],
        "test": [f"images_evaluation/{c}" for c in picks["images_evaluation"]],
    }


def test_omniglot_folders_give_the_lake_split_tasks(data_dir: Path, tmp_path: Path) -> None:
    # the same characters as one zip of class folders (images_background/<Alphabet>/<character>/ ...) with class
    # lists of Lake's parts give the same tasks as data=omniglot data.split=lake; Omniglot's reader inverts
    # strokes to bright, the folder reader keeps the files' dark strokes: pixels are 255 - Omniglot's
    lists = _lists(tmp_path / "lists", _lake_subset(data_dir, tmp_path))
    shape = {"image_size": 28, "channels": 1, "n_way": 2, "k_shot": 1, "k_query": 5, "mean": [0.0], "std": [1.0]}
    folder = _module(tmp_path / "mine.zip", tmp_path / "cache", split="lists", source={"lists": str(lists)}, **shape)
    lake = _module(tmp_path, tmp_path / "cache", dataset="omniglot", split="lake", source=None, **shape)
    for module in (folder, lake):
        module.setup()
    assert (folder.train_classes, folder.val_classes, folder.test_classes) == (lake.train_classes, lake.val_classes, lake.test_classes) == (3, 2, 2)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for mine, theirs in zip(getattr(folder, name)(), getattr(lake, name)()):
            for key in ("support_x", "query_x"):
                assert torch.equal(mine[key], 255 - theirs[key])
            assert torch.equal(mine["query_y"], theirs["query_y"])


def test_train_py_reports_a_bad_folder_in_one_line(tmp_path: Path, train_py_in_process) -> None:
    lists = _lists(tmp_path / "lists", {**GOOD_LISTS, "val": ["animals/class9"]})
    write_folder(tmp_path / "images", TREE)
    args = ["data=folder", f"data.root={tmp_path / 'images'}", f"data.source.lists={lists}", "debug=fast_dev_run"]
    status, output = train_py_in_process(tmp_path, tmp_path / "logs", *args)
    assert status == 2, output[-2000:]
    assert "val.txt:2: class 'animals/class9' is not a class folder" in output and "Traceback" not in output
