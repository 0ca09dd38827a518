"""Omniglot loading: split sizes, rotations, stroke convention, layouts, download and bad inputs."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalight.data.images import to_chw
from metalight.data.class_lists import SPLITS_DIR
from metalight.data.omniglot import LAKE_VAL_ALPHABETS, _vinyals_classes, list_characters, load_omniglot, vinyals_file
from metalight.errors import DataError


@pytest.fixture(scope="module")
def vinyals(data_dir: Path, cache_dir: Path) -> dict:
    """The Vinyals split of the real data (decoded once per session into the shared cache)."""
    return load_omniglot(data_dir, "vinyals", 28, cache_dir)


@pytest.fixture(scope="module")
def lake(data_dir: Path, cache_dir: Path, vinyals: dict) -> dict:
    """The Lake split of the real data (same character cache as vinyals)."""
    return load_omniglot(data_dir, "lake", 28, cache_dir)


def _character(name: str) -> str:
    return name.rsplit("/rot", 1)[0]


def test_vinyals_counts(vinyals: dict) -> None:
    assert {p: len(s.classes) for p, s in vinyals.items()} == {"train": 4112, "val": 688, "test": 1692}
    for split in vinyals.values():
        assert split.images.shape == (len(split.classes) * 20, 1, 28, 28)
        assert set(split.counts.tolist()) == {20}
        assert split.images.dtype == np.uint8
    characters = {p: len({_character(c) for c in s.classes}) for p, s in vinyals.items()}
    assert characters == {"train": 1028, "val": 172, "test": 423}


def test_lake_counts_and_alphabets(lake: dict, data_dir: Path) -> None:
    assert {p: len(s.classes) for p, s in lake.items()} == {"train": 806, "val": 158, "test": 659}
    assert {c.split("/")[0] for c in lake["val"].classes} == set(LAKE_VAL_ALPHABETS)
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as zf:
        evaluation = {n.split("/")[1] for n in zf.namelist()}
    assert {c.split("/")[0] for c in lake["test"].classes} == evaluation
    assert not {c.split("/")[0] for c in lake["train"].classes} & (evaluation | set(LAKE_VAL_ALPHABETS))


def test_lake_rotated_adds_three_turned_copies_of_each_training_character(lake: dict, data_dir: Path, cache_dir: Path) -> None:
    rotated = load_omniglot(data_dir, "lake_rotated", 28, cache_dir)
    assert {p: len(s.classes) for p, s in rotated.items()} == {"train": 3224, "val": 158, "test": 659}
    for part in ("val", "test"):
        assert rotated[part].classes == lake[part].classes
        assert np.array_equal(rotated[part].images, lake[part].images)
    start, name = lake["train"].starts[7], lake["train"].classes[7]
    drawings = lake["train"].images[start: start + 20]
    for turns in (0, 1, 2, 3):
        label = name if turns == 0 else f"{name}/rot{90 * turns:03d}"
        c = rotated["train"].classes.index(label)
        turned = rotated["train"].images[rotated["train"].starts[c]: rotated["train"].starts[c] + 20]
        assert np.array_equal(turned, np.rot90(drawings, turns, axes=(-2, -1)))
        assert not turns or not np.array_equal(turned, drawings)


@pytest.mark.parametrize("split", ["vinyals", "lake"])
def test_splits_disjoint(split: str, request: pytest.FixtureRequest) -> None:
    parts = request.getfixturevalue(split)
    chars = {p: {_character(c) for c in s.classes} for p, s in parts.items()}
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]


def _first_drawing(data_dir: Path, character: str) -> Image.Image:
    """The first drawing of a character, read straight from the real archive."""
    for archive in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(data_dir / "omniglot" / f"{archive}.zip") as zf:
            names = sorted(n for n in zf.namelist() if n.startswith(f"{archive}/{character}/"))
            if names:
                return Image.open(io.BytesIO(zf.read(names[0]))).convert("L")
    raise AssertionError(f"{character} not found")


def test_rotated_classes_are_rotations(vinyals: dict, data_dir: Path) -> None:
    split = vinyals["test"]
    index = {c: i for i, c in enumerate(split.classes)}
    character = _character(split.classes[0])
    drawing = _first_drawing(data_dir, character)
    # decoded independently: PIL rotation (counterclockwise, as Prototypical Networks) first, then resize, invert
    references = [to_chw(drawing.rotate(90 * t), "L", 28, invert=True).astype(int) for t in range(4)]
    for turns in range(4):
        image = split.images[split.starts[index[f"{character}/rot{90 * turns:03d}"]]].astype(int)
        errors = [np.abs(image - reference).mean() for reference in references]
        # resize-then-rotate vs rotate-then-resize differ only by the rounding of PIL's two resize passes
        assert errors[turns] < 4, errors
        assert all(e > 30 for t, e in enumerate(errors) if t != turns), errors
    def drawings(name: str) -> np.ndarray:
        return split.images[split.starts[index[name]] : split.starts[index[name]] + 20]

    base = drawings(f"{character}/rot000")
    assert np.array_equal(drawings(f"{character}/rot090"), np.rot90(base, 1, axes=(-2, -1)))


def test_strokes_bright_on_dark(vinyals: dict) -> None:
    images = vinyals["val"].images
    assert images.max() == 255 and images.min() == 0
    assert np.median(images) == 0 and images.mean() < 64  # mostly background, which is 0


def _fake_omniglot(data_dir: Path, root: Path, background: str = "zip", with_splits: bool = True) -> Path:
    """A tiny Omniglot: 2 background characters (zip or folder) and 1 evaluation character, real drawings."""
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    picks = {
        "images_background": ["Latin/character01", "Latin/character02"],
        "images_evaluation": ["Angelic/character01"],
    }
    for archive, characters in picks.items():
        with zipfile.ZipFile(data_dir / "omniglot" / f"{archive}.zip") as src:
            members = [n for n in src.namelist() if any(n.startswith(f"{archive}/{c}/") for c in characters)]
            if archive == "images_background" and background == "folder":
                src.extractall(folder, members)
            else:
                with zipfile.ZipFile(folder / f"{archive}.zip", "w") as dst:
                    for name in members:
                        dst.writestr(name, src.read(name))
    if with_splits:
        (folder / "splits" / "vinyals").mkdir(parents=True)
        lines = {
            "train": ["Latin/character01/rot000", "Latin/character01/rot180"],
            "val": ["Latin/character02/rot090"],
            "test": ["Angelic/character01/rot270"],
        }
        for part, rows in lines.items():
            (folder / "splits" / "vinyals" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_folder_and_zip_layouts_agree(data_dir: Path, tmp_path: Path) -> None:
    _fake_omniglot(data_dir, tmp_path / "z", "zip")
    _fake_omniglot(data_dir, tmp_path / "f", "folder")
    zipped = load_omniglot(tmp_path / "z", "vinyals", 28, tmp_path / "cache")
    unpacked = load_omniglot(tmp_path / "f", "vinyals", 28, tmp_path / "cache")
    for part in ("train", "val", "test"):
        assert zipped[part].classes == unpacked[part].classes
        assert np.array_equal(zipped[part].images, unpacked[part].images)
    assert zipped["train"].classes == ["Latin/character01/rot000", "Latin/character01/rot180"]


def test_download_uses_torchvision_checksums(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import Omniglot, utils

    source = _fake_omniglot(data_dir, tmp_path / "src", with_splits=False)
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(utils, "download_url", fake_download)
    root = tmp_path / "empty"
    (root / "omniglot").mkdir(parents=True)
    parts = load_omniglot(root, "lake", 28, tmp_path / "cache", download=True)
    assert [len(parts[p].classes) for p in ("train", "val", "test")] == [2, 0, 1]
    assert calls == [
        (f"{Omniglot.download_url_prefix}/{a}.zip", f"{a}.zip", Omniglot.zips_md5[a])
        for a in ("images_background", "images_evaluation")
    ]


def test_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import utils

    def failing_download(url: str, root: str, filename: str, md5: str) -> None:
        (Path(root) / filename).write_bytes(b"partial")
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(utils, "download_url", failing_download)
    (tmp_path / "omniglot").mkdir()
    with pytest.raises(DataError, match="could not download"):
        load_omniglot(tmp_path, "lake", 28, tmp_path / "cache", download=True)
    assert not (tmp_path / "omniglot" / "images_background.zip").exists()


def test_missing_archive(tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    with pytest.raises(DataError, match=r"images_background.*data.download=true"):
        load_omniglot(tmp_path, "lake", 28, tmp_path / "cache")


def test_shipped_vinyals_lists_equal_the_published_files(data_dir: Path) -> None:
    # a fresh clone has only the archives: the lists shipped in the package stand in for splits/vinyals/
    characters, _, _ = list_characters(data_dir / "omniglot")
    for part in ("train", "val", "test"):
        shipped = vinyals_file(data_dir / "nowhere", part)
        assert shipped.parent == SPLITS_DIR / "omniglot_vinyals"
        assert shipped.read_bytes() == (data_dir / "omniglot" / "splits" / "vinyals" / f"{part}.txt").read_bytes()
        assert vinyals_file(data_dir / "omniglot", part).parent == data_dir / "omniglot" / "splits" / "vinyals"
    assert _vinyals_classes(data_dir / "nowhere", "val", characters)[0] == ("Hebrew/character01/rot000", "Hebrew/character01", 0)


def test_without_split_files_the_shipped_lists_are_used(data_dir: Path, tmp_path: Path) -> None:
    _fake_omniglot(data_dir, tmp_path, with_splits=False)  # 3 characters: the shipped lists name 1623
    with pytest.raises(DataError, match=r"splits/omniglot_vinyals/train.txt has no images"):
        load_omniglot(tmp_path, "vinyals", 28, tmp_path / "cache")
    (tmp_path / "omniglot" / "splits" / "vinyals").mkdir(parents=True)  # a user folder wins, even a broken one
    with pytest.raises(DataError, match=r"(?s)splits/vinyals/train.txt not found.*remove"):
        load_omniglot(tmp_path, "vinyals", 28, tmp_path / "cache")


@pytest.mark.parametrize(
    ("line", "message"),
    [("Latin/character09/rot000", "has no images"), ("Latin/character01/rot045", "rotDDD"), ("garbage", "rotDDD")],
)
def test_bad_split_line(data_dir: Path, tmp_path: Path, line: str, message: str) -> None:
    folder = _fake_omniglot(data_dir, tmp_path)
    (folder / "splits" / "vinyals" / "val.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        load_omniglot(tmp_path, "vinyals", 28, tmp_path / "cache")


def test_corrupt_image_is_named(data_dir: Path, tmp_path: Path) -> None:
    folder = _fake_omniglot(data_dir, tmp_path, background="folder")
    broken = sorted((folder / "images_background" / "Latin" / "character02").iterdir())[3]
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=broken.name):
        load_omniglot(tmp_path, "vinyals", 28, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy")), "a failed build must not leave a cache behind"


def test_unequal_counts(data_dir: Path, tmp_path: Path) -> None:
    folder = _fake_omniglot(data_dir, tmp_path, background="folder")
    sorted((folder / "images_background" / "Latin" / "character02").iterdir())[0].unlink()
    with pytest.raises(DataError, match="same count"):
        load_omniglot(tmp_path, "vinyals", 28, tmp_path / "cache")
