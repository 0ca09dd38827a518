"""miniImageNet loading: real split sizes, the four layouts (on tiny copies), caching and bad inputs."""

import csv
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from metalight.data.miniimagenet import PARTS, image_classes, load_miniimagenet, load_part
from metalight.errors import DataError

WNIDS = 3
PER_CLASS = 4


@pytest.fixture(scope="module")
def mini_dir(data_dir: Path) -> Path:
    """The real miniImageNet folder."""
    if not (data_dir / "miniimagenet").is_dir():
        pytest.skip(f"no miniimagenet/ under {data_dir}")
    return data_dir / "miniimagenet"


def test_real_split_sizes(mini_dir: Path) -> None:
    found = {part: image_classes(mini_dir, part) for part in PARTS}
    assert {p: len(f[1]) for p, f in found.items()} == {"train": 64, "val": 16, "test": 20}
    assert all(len(refs) == 600 for f in found.values() for refs in f[1].values())
    wnids = [set(f[1]) for f in found.values()]
    assert not wnids[0] & wnids[1] and not wnids[0] & wnids[2] and not wnids[1] & wnids[2]


def test_real_val_split_decodes(data_dir: Path, mini_dir: Path, cache_dir: Path) -> None:
    val = load_part(data_dir, "val", 84, cache_dir)
    assert val.images.shape == (16 * 600, 3, 84, 84) and val.images.dtype == np.uint8
    assert val.counts.tolist() == [600] * 16 and val.starts.tolist() == list(range(0, 9600, 600))
    assert val.classes == sorted(image_classes(mini_dir, "val")[1])
    again = load_part(data_dir, "val", 84, cache_dir)
    assert isinstance(again.images, np.memmap)


@pytest.fixture(scope="module")
def picks(mini_dir: Path) -> dict[str, dict[str, bytes]]:
    """A handful of real JPEGs per part: part -> {'<wnid>/<file>': bytes}, 3 classes x 4 images."""
    out = {}
    for part in PARTS:
        with zipfile.ZipFile(mini_dir / f"images_{part}.zip") as zf:
            by_class: dict[str, list[str]] = {}
            for name in sorted(zf.namelist()):
                by_class.setdefault(name.split("/")[1], []).append(name)
            chosen = [n for wnid in sorted(by_class)[:WNIDS] for n in by_class[wnid][:PER_CLASS]]
            out[part] = {"/".join(n.split("/")[1:]): zf.read(n) for n in chosen}
    return out


def _make(layout: str, root: Path, picks: dict, decoded: dict | None = None) -> Path:
    """A tiny miniImageNet of `layout` (folders, zips, flat, pickle) under root/miniimagenet."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    for part, files in picks.items():
        if layout == "folders":
            for name, data in files.items():
                (folder / part / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / part / name).write_bytes(data)
        elif layout == "zips":
            with zipfile.ZipFile(folder / f"images_{part}.zip", "w") as zf:
                for name, data in files.items():
                    zf.writestr(f"{part}/{name}", data)
        elif layout == "flat":
            (folder / "images").mkdir(exist_ok=True)
            (folder / "splits").mkdir(exist_ok=True)
            with (folder / "splits" / f"{part}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "label"])
                for name, data in files.items():
                    wnid, filename = name.split("/")
                    (folder / "images" / filename).write_bytes(data)
                    writer.writerow([filename, wnid])
        else:  # pickle: rows shuffled, class_dict listing each class's rows in their original order
            flat = decoded[part].images.transpose(0, 2, 3, 1)  # [classes * per_class, H, W, 3], class-major
            order = np.random.default_rng(0).permutation(len(flat))  # pickle row r holds image order[r]
            rows = {
                wnid: sorted(np.flatnonzero(order // PER_CLASS == c).tolist(), key=lambda r: order[r])
                for c, wnid in enumerate(decoded[part].classes)
            }
            name = {"train": "train", "val": "validation", "test": "test"}[part]
            with (folder / f"mini-imagenet-cache-{name}.pkl").open("wb") as f:
                pickle.dump({"image_data": np.ascontiguousarray(flat[order]), "class_dict": rows}, f)
    return folder


@pytest.mark.parametrize("image_size", [84, 32])
def test_all_layouts_agree(picks: dict, tmp_path: Path, image_size: int) -> None:
    results = {}
    for layout in ("folders", "zips", "flat"):
        _make(layout, tmp_path / layout, picks)
        results[layout] = load_miniimagenet(tmp_path / layout, "ravi", image_size, tmp_path / "cache")
    _make("pickle", tmp_path / "pickle", picks, load_miniimagenet(tmp_path / "zips", "ravi", 84, tmp_path / "cache"))
    results["pickle"] = load_miniimagenet(tmp_path / "pickle", "ravi", image_size, tmp_path / "cache")
    reference = results["zips"]
    for layout, parts in results.items():
        for part in PARTS:
            assert parts[part].classes == sorted({n.split("/")[0] for n in picks[part]}), layout
            assert parts[part].images.shape == (WNIDS * PER_CLASS, 3, image_size, image_size), layout
            assert np.array_equal(parts[part].images, reference[part].images), layout


def test_cache_rebuilt_when_source_changes(picks: dict, tmp_path: Path) -> None:
    folder = _make("folders", tmp_path, picks)
    cache = tmp_path / "cache"
    first = np.array(load_part(tmp_path, "val", 84, cache).images)
    npy = next(cache.glob("*val*.npy"))
    # a changed image (new content and mtime) is noticed and decoded again
    victim = sorted((folder / "val").glob("*/*.jpg"))[0]
    victim.write_bytes(sorted((folder / "val").glob("*/*.jpg"))[-1].read_bytes())
    os.utime(victim, ns=(1, 1))
    changed = np.array(load_part(tmp_path, "val", 84, cache).images)
    assert np.array_equal(changed[0], first[-1]) and not np.array_equal(changed[0], first[0])
    # a truncated cache file, or a sidecar recording another key, is rebuilt rather than trusted
    npy.write_bytes(npy.read_bytes()[:1000])
    assert np.array_equal(load_part(tmp_path, "val", 84, cache).images, changed)
    sidecar = npy.with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace('"image_size": 84', '"image_size": 85'))
    np.save(npy, np.zeros_like(changed))  # valid .npy of the right shape, wrong contents
    assert np.array_equal(load_part(tmp_path, "val", 84, cache).images, changed)
    assert not list(cache.glob("*.tmp")), "temporary files are moved into place or removed"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="miniimagenet not found"):
        load_miniimagenet(tmp_path, "ravi", 84, tmp_path / "cache")


def test_no_layout_for_a_part(picks: dict, tmp_path: Path) -> None:
    folder = _make("zips", tmp_path, picks)
    (folder / "images_test.zip").unlink()
    with pytest.raises(DataError, match=r"test split not found.*images_test.zip.*splits/test.csv.*cache-test.pkl"):
        load_miniimagenet(tmp_path, "ravi", 84, tmp_path / "cache")


def test_flat_layout_needs_split_file(picks: dict, tmp_path: Path) -> None:
    folder = _make("flat", tmp_path, picks)
    (folder / "splits" / "val.csv").unlink()
    with pytest.raises(DataError, match=r"splits/val.csv not found"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")


def test_flat_layout_missing_image(picks: dict, tmp_path: Path) -> None:
    folder = _make("flat", tmp_path, picks)
    missing = sorted((folder / "images").iterdir())[0]
    missing.unlink()
    part = next(p for p in PARTS if any(n.endswith(missing.name) for n in picks[p]))
    with pytest.raises(DataError, match=rf"{missing.name} listed in .*{part}.csv not found"):
        load_part(tmp_path, part, 84, tmp_path / "cache")


def test_empty_class_folder(picks: dict, tmp_path: Path) -> None:
    folder = _make("folders", tmp_path, picks)
    (folder / "val" / "n99999999").mkdir()
    with pytest.raises(DataError, match="'n99999999'.*has no images"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")


def test_unequal_class_sizes(picks: dict, tmp_path: Path) -> None:
    folder = _make("folders", tmp_path, picks)
    sorted((folder / "val").glob("*/*.jpg"))[0].unlink()
    with pytest.raises(DataError, match="same count"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")


def test_corrupt_image_is_named(picks: dict, tmp_path: Path) -> None:
    folder = _make("zips", tmp_path, picks)
    name = sorted(picks["val"])[5]
    with zipfile.ZipFile(folder / "images_val.zip", "w") as zf:
        for member, data in picks["val"].items():
            zf.writestr(f"val/{member}", b"\xff\xd8 truncated" if member == name else data)
    with pytest.raises(DataError, match=rf"images_val.zip::val/{name}"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")


def test_bad_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    (folder / "mini-imagenet-cache-validation.pkl").write_bytes(b"definitely not a pickle")
    with pytest.raises(DataError, match="cannot read .*mini-imagenet-cache-validation.pkl"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")
    with (folder / "mini-imagenet-cache-validation.pkl").open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": [0, 5]}}, f)
    with pytest.raises(DataError, match="row indices outside"):
        load_part(tmp_path, "val", 84, tmp_path / "cache")


def test_unwritable_cache_dir(picks: dict, tmp_path: Path) -> None:
    _make("zips", tmp_path, picks)
    (tmp_path / "not_a_folder").write_text("")
    with pytest.raises(DataError, match="data.cache_dir"):
        load_part(tmp_path, "val", 84, tmp_path / "not_a_folder" / "cache")
