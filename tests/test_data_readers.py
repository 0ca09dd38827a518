"""CIFAR-FS, FC100, tieredImageNet and CUB readers on tiny files in each set's real format, and the shipped split lists."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from metalight.data.cifar import load_cifar_fs, load_fc100
from metalight.data.class_lists import PARTS, SPLITS_DIR, packaged
from metalight.data.cub import load_cub
from metalight.data.tiered_imagenet import load_tiered_imagenet
from metalight.errors import DataError
from synthetic_data import SIZE, TIERED_COUNTS, cifar_names, cub_classes, tiered_arrays, write_cifar100, write_cub, write_tiered

# published class counts: CIFAR-FS (Bertinetto et al. 2019), FC100 superclasses (Oreshkin et al. 2018),
# CUB (Chen et al. 2019), tieredImageNet (Ren et al. 2018), Omniglot (Vinyals et al. 2016, x4 rotations)
PUBLISHED = {
    "cifar_fs": (64, 16, 20),
    "fc100": (12, 4, 4),
    "cub": (100, 50, 50),
    "tiered_imagenet": (351, 97, 160),
    "omniglot_vinyals": (4112, 688, 1692),
}
MEMBERS = {  # a few named classes of each published list, read off the source files cited in splits/README.md
    "cifar_fs": {"train": ["dolphin", "seal", "aquarium_fish"], "val": ["beaver", "otter", "tractor"], "test": ["whale", "poppy", "rocket"]},
    "fc100": {"train": ["fish", "vehicles_2"], "val": ["large_carnivores", "small_mammals"], "test": ["aquatic_mammals", "people"]},
    "cub": {"train": ["001.Black_footed_Albatross", "003.Sooty_Albatross"], "val": ["002.Laysan_Albatross"], "test": ["004.Groove_billed_Ani", "200.Common_Yellowthroat"]},
    "tiered_imagenet": {"train": ["n01530575"], "val": ["n02099267", "n04467665"], "test": ["n03314780"]},
    "omniglot_vinyals": {"train": ["Angelic/character01/rot000", "Gujarati/character01/rot180"], "val": ["Hebrew/character01/rot090"], "test": ["Gurmukhi/character42/rot270"]},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_split_lists(name: str) -> None:
    parts = {part: packaged(name, part) for part in PARTS}
    assert tuple(len(parts[p]) for p in PARTS) == PUBLISHED[name]
    assert all(len(set(names)) == len(names) for names in parts.values()), "no class listed twice"
    assert not set(parts["train"]) & set(parts["val"]) and not set(parts["train"]) & set(parts["test"])
    assert not set(parts["val"]) & set(parts["test"])
    for part, members in MEMBERS[name].items():
        assert set(members) <= set(parts[part]), (part, members)
    assert name in (SPLITS_DIR / "README.md").read_text(), "provenance of every shipped list in splits/README.md"


def test_cub_lists_follow_chen_et_al_rule() -> None:
    # write_CUB_filelist.py of CloserLookFewShot: over the 200 sorted class folders (index i from 0),
    # base = i % 2 == 0, val = i % 4 == 1, novel = i % 4 == 3
    classes = cub_classes()
    rule = {"train": [c for i, c in enumerate(classes) if i % 2 == 0], "val": classes[1::4], "test": classes[3::4]}
    assert {part: packaged("cub", part) for part in PARTS} == rule


def test_tiered_lists_group_whole_categories() -> None:
    categories = {}
    for part in PARTS:
        rows = [line.split(",") for line in (SPLITS_DIR / "tiered_imagenet" / f"{part}.csv").read_text().split()]
        categories[part] = {category for _, category in rows}
    assert [len(categories[p]) for p in PARTS] == [20, 6, 8]
    assert not categories["train"] & categories["val"] and not categories["train"] & categories["test"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding a tiny cifar100/ and cub/ (read-only for the tests: they copy what they break)."""
    root = tmp_path_factory.mktemp("data")
    write_cifar100(root)
    write_cub(root)
    return root


def test_cifar_fs_and_fc100_read_the_cifar100_files(data_root: Path, tmp_path: Path) -> None:
    fine_names, coarse_names = cifar_names()
    fs = load_cifar_fs(data_root, "bertinetto", SIZE * 4, tmp_path, checksum=False)
    fc = load_fc100(data_root, "oreshkin", SIZE * 4, tmp_path, checksum=False)
    assert [len(fs[p].classes) for p in PARTS] == [64, 16, 20]
    assert [len(fc[p].classes) for p in PARTS] == [60, 20, 20]
    for parts in (fs, fc):
        assert not set(parts["train"].classes) & set(parts["val"].classes)
        assert not set(parts["val"].classes) & set(parts["test"].classes)
        assert not set(parts["train"].classes) & set(parts["test"].classes)
    assert fs["train"].classes == packaged("cifar_fs", "train")
    for part in PARTS:  # FC100: every class of a part comes from that part's superclasses
        wanted = set(packaged("fc100", part))
        assert {coarse_names[fine_names.index(c) % 20] for c in fc[part].classes} == wanted
    seal = fs["train"].subset(["seal"])
    images = seal.images[seal.starts[0] : seal.starts[0] + seal.counts[0]]
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8  # 2 train + 1 test image, CHW
    assert (images[:, 0] == fine_names.index("seal")).all(), "red plane = the fine class"
    assert images[:, 1, 0, 0].tolist() == [0, 1, 0] and images[:, 2, 0, 0].tolist() == [0, 0, 1], "train file first"
    assert fs["train"].images.filename == fc["val"].images.filename, "one cache for both splits of CIFAR-100"
    resized = load_cifar_fs(data_root, "bertinetto", SIZE, tmp_path / "small", checksum=False)
    assert resized["test"].images.shape == (100 * 3, 3, SIZE, SIZE) and resized["test"].counts.sum() == 20 * 3


def test_cifar_checksums_and_download(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR100, utils

    folder = data_root / "cifar100" / "cifar-100-python"
    with pytest.raises(DataError, match=r"cifar-100-python/train does not match torchvision's CIFAR-100 checksum.*checksum=false"):
        load_cifar_fs(data_root, "bertinetto", 32, tmp_path)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.tmp")), "no partial cache"
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    assert len(load_fc100(data_root, "oreshkin", 32, tmp_path)["test"].classes) == 20, "checksums match: read"

    calls = []

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        write_cifar100(Path(download_root).parent)

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=r"cifar-100-python/train not found.*data.download=true"):
        load_cifar_fs(empty, "bertinetto", 32, tmp_path)
    assert len(load_cifar_fs(empty, "bertinetto", 32, tmp_path, download=True)["val"].classes) == 16
    assert calls == [(CIFAR100.url, CIFAR100.filename, CIFAR100.tgz_md5)]


@pytest.mark.parametrize("layout", ["png", "npz"])
def test_tiered_imagenet_layouts(layout: str, tmp_path: Path) -> None:
    write_tiered(tmp_path, layout)
    parts = load_tiered_imagenet(tmp_path, "ren", SIZE, tmp_path / "cache")
    for part in PARTS:
        images, labels, names = tiered_arrays(part)
        split = parts[part]
        assert split.classes == names and split.counts.tolist() == TIERED_COUNTS[part]
        assert split.images.shape == (sum(TIERED_COUNTS[part]), 3, SIZE, SIZE) and split.images.dtype == np.uint8
        for c in range(len(names)):  # class-grouped, file order kept, RGB (the npz's BGR flipped)
            block = split.images[split.starts[c] : split.starts[c] + split.counts[c]]
            assert block[:, 0, 0, 0].tolist() == [c] * split.counts[c]
            assert block[:, 1, 0, 0].tolist() == list(range(split.counts[c]))
            assert (block[:, 2] == 9).all()
    assert len({n for p in PARTS for n in parts[p].classes}) == sum(len(parts[p].classes) for p in PARTS)


def test_tiered_imagenet_bad_files(tmp_path: Path) -> None:
    folder = write_tiered(tmp_path, "png")
    original = (folder / "val_labels.pkl").read_bytes()
    labels = pickle.loads(original)
    labels["label_specific"] = np.append(labels["label_specific"], 0)
    (folder / "val_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
    with pytest.raises(DataError, match=r"val_images_png.pkl holds 12 images but its labels file lists 13"):
        load_tiered_imagenet(tmp_path, "ren", SIZE, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*val*.npy")), "no partial cache"
    (folder / "val_labels.pkl").write_bytes(original)
    (folder / "test_labels.pkl").unlink()
    (folder / "test_images_png.pkl").unlink()
    with pytest.raises(DataError, match=r"tieredImageNet test split not found.*test_images.npz.*test/<wnid>"):
        load_tiered_imagenet(tmp_path, "ren", SIZE, tmp_path / "cache")


def test_tiered_imagenet_class_folders(tmp_path: Path) -> None:
    from synthetic_data import write_folder

    folder = tmp_path / "tiered_imagenet"
    wnids = packaged("tiered_imagenet", "val")
    write_folder(folder / "val", {w: 1 + i % 3 for i, w in enumerate(wnids)} | {"n00000000": 2})
    from metalight.data.tiered_imagenet import load_part

    val = load_part(tmp_path, "val", SIZE, tmp_path / "cache")
    assert val.classes == wnids, "the shipped list's classes, in its order; other folders ignored"
    assert val.counts.tolist() == [1 + i % 3 for i in range(len(wnids))]
    (folder / "val" / wnids[3] / "000.png").unlink()
    with pytest.raises(DataError, match=rf"class {wnids[3]} has no images .*1 of the 97 classes"):
        load_part(tmp_path, "val", SIZE, tmp_path / "cache")


def test_cub_reads_the_official_layout(data_root: Path, tmp_path: Path) -> None:
    parts = load_cub(data_root, "chen", SIZE, tmp_path)
    assert [len(parts[p].classes) for p in PARTS] == [100, 50, 50]
    assert all(parts[p].classes == packaged("cub", p) for p in PARTS)
    names = cub_classes()
    split = parts["val"]
    c = split.classes.index("002.Laysan_Albatross")
    photos = split.images[split.starts[c] : split.starts[c] + split.counts[c]].astype(int)
    assert photos.shape == (3, 3, SIZE, SIZE), "three photos, resized whole to SIZE x SIZE"
    assert abs(photos[:, 0, :, 0].mean() - names.index("002.Laysan_Albatross")) <= 3, "left edge: the coded half"
    assert (photos[:, :, :, -1] >= 240).all(), "right edge: the white half"
    assert [round(p[1, :, 0].mean() / 10) for p in photos] == [0, 1, 2], "ordered by image id, not by images.txt line"
    cropped = load_cub(data_root, "chen", SIZE, tmp_path, crop=True)["val"]
    crop = cropped.images[cropped.starts[c] : cropped.starts[c] + cropped.counts[c]].astype(int)
    assert abs(crop[:, 0].mean() - names.index("002.Laysan_Albatross")) <= 3, "cropped to the box: the coded half only"
    grey = next(parts[p] for p in PARTS if names[5] in parts[p].classes)  # write_cub's grey class
    g = grey.classes.index(names[5])
    image = grey.images[grey.starts[g]].astype(int)
    assert image.shape == (3, SIZE, SIZE) and (image[0] == image[1]).all() and (image[1] == image[2]).all(), "grey -> RGB"


def test_cub_bad_files(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CUB-200-2011 not found: no images.txt"):
        load_cub(tmp_path, "chen", SIZE, tmp_path / "cache")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_root, copy)
    folder = copy / "cub" / "CUB_200_2011"
    victim = sorted((folder / "images" / "002.Laysan_Albatross").iterdir())[1]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=rf"cannot read image .*{victim.name}"):
        load_cub(copy, "chen", SIZE, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob("*.tmp"))
    classes = (folder / "classes.txt").read_text().replace("002.Laysan_Albatross", "002.Laysan")
    (folder / "classes.txt").write_text(classes)
    with pytest.raises(DataError, match=r"'002.Laysan_Albatross' of the shipped CUB val list"):
        load_cub(copy, "chen", SIZE, tmp_path / "cache")


def _synthetic_module(dataset: str, root: Path, cache: Path, **overrides) -> "FewShotDataModule":
    """A data module of a new set on its synthetic files: 2-way 1-shot 1-query, 4 tasks per meta-step."""
    from metalight.data import FewShotDataModule

    split = {"cifar_fs": "bertinetto", "fc100": "oreshkin", "tiered_imagenet": "ren", "cub": "chen", "folder": "ratios"}[dataset]
    source = {"cifar_fs": {"checksum": False}, "fc100": {"checksum": False}, "cub": {"crop": True},
              "folder": {"ratios": [0.5, 0.25, 0.25], "split_seed": 0}}.get(dataset)
    kwargs = {
        "dataset": dataset, "root": str(root), "split": split, "image_size": SIZE, "channels": 3, "n_way": 2, "k_shot": 1,
        "k_query": 1, "meta_batch_size": 4, "eval_batch_size": 3, "batches_per_epoch": 2, "n_val_tasks": 6,
        "n_test_tasks": 6, "seed": 5, "mean": [0.5] * 3, "std": [0.25] * 3, "source": source, "cache_dir": str(cache),
    }
    return FewShotDataModule(**{**kwargs, **overrides})


@pytest.mark.parametrize("dataset", ["cifar_fs", "fc100", "tiered_imagenet", "cub", "folder"])
def test_new_sets_give_pure_rank_sharded_episodes(dataset: str, data_root: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch

    from synthetic_data import write_folder

    if dataset == "tiered_imagenet":
        write_tiered(tmp_path, "npz")
        root = tmp_path
    elif dataset == "folder":
        root = write_folder(tmp_path / "images", {f"class{i}": 2 + i % 3 for i in range(8)})
    else:
        root = data_root
    modules = [_synthetic_module(dataset, root, tmp_path / "cache") for _ in range(2)]
    for module in modules:
        module.setup()
    train = [next(iter(m.train_dataloader())) for m in modules]
    assert torch.equal(train[0]["query_x"], train[1]["query_x"]), "a fresh module draws the same tasks"
    assert train[0]["support_x"].shape == (4, 2, 3, SIZE, SIZE) and train[0]["support_x"].dtype == torch.uint8
    dataset_ = modules[0]._datasets["train"]
    assert torch.equal(dataset_[[(0, 3)]]["query_x"][0], train[0]["query_x"][3]), "task = f(seed, split, epoch, index)"
    assert not torch.equal(dataset_[[(1, 3)]]["query_x"], dataset_[[(0, 3)]]["query_x"]), "another epoch, other tasks"
    whole = torch.cat([b["support_x"] for b in modules[0].test_dataloader()])
    shards, steps = [], []
    for rank in range(2):
        modules[1].trainer = SimpleNamespace(global_rank=rank, world_size=2)
        modules[1]._resume_position = lambda: (0, 0)
        shards.append(torch.cat([b["support_x"] for b in modules[1].test_dataloader()]))
        steps.append(next(iter(modules[1].train_dataloader()))["support_x"])
    assert torch.equal(shards[0], whole[0::2]) and torch.equal(shards[1], whole[1::2])
    assert torch.equal(torch.cat(steps), train[0]["support_x"]), "each rank its own slice of the meta-step"
