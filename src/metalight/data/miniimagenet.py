"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split, read from any of its common layouts.

Layouts under `<root>/miniimagenet`, tried in this order for each part (train, val, test):
1. per-split folders `<part>/<wnid>/*.jpg`;
2. per-split zips `images_<part>.zip` holding `<part>/<wnid>/<file>.jpg`;
3. one flat `images/` folder with every file, plus `splits/<part>.csv` (header `filename,label`);
4. pickled caches `mini-imagenet-cache-{train,validation,test}.pkl`, each a dict with `image_data`
   (N x H x W x 3 uint8) and `class_dict` (wnid -> row indices).
Classes are ordered by wnid and images by file name (row order for the pickles), so every layout of the
same files yields the same tasks. Images are RGB, resized with antialiasing when image_size is not theirs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from metalight.data.cache import cache_name, cached, load_cache, write_cache
from metalight.data.images import (
    ImageRef,
    SplitImages,
    arrays_to_chw,
    check_equal_counts,
    class_folders,
    decode_classes,
    file_identity,
    files_digest,
    read_pickle,
    zip_images,
)
from metalight.errors import DataError

SPLITS = ("ravi",)
PARTS = ("train", "val", "test")
PICKLE_PART = {"train": "train", "val": "validation", "test": "test"}


def _folder_source(directory: Path) -> tuple[dict[str, list[ImageRef]], list]:
    """Classes of a `<part>/<wnid>/*.jpg` folder and its identity."""
    classes = class_folders(directory)
    return classes, [str(directory.resolve()), files_digest(Path(r.name) for refs in classes.values() for r in refs)]


def _zip_source(archive: Path) -> tuple[dict[str, list[ImageRef]], list]:
    """Classes of an `images_<part>.zip` (members `<part>/<wnid>/<file>`) and its identity."""
    classes: dict[str, list[ImageRef]] = {}
    for name in zip_images(archive):
        classes.setdefault(name.split("/")[-2], []).append(ImageRef(name, archive))
    return classes, file_identity(archive)


def _flat_source(folder: Path, part: str) -> tuple[dict[str, list[ImageRef]], list]:
    """Classes of the flat `images/` folder listed by `splits/<part>.csv`, and their identity."""
    table = folder / "splits" / f"{part}.csv"
    if not table.is_file():
        raise DataError(
            f"split file {table} not found: the flat images/ layout needs splits/{{train,val,test}}.csv of "
            "Ravi & Larochelle (header `filename,label`); copy them there."
        )
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise DataError(f"{table} has no `filename,label` header or no rows: restore the original split file.")
    classes: dict[str, list[ImageRef]] = {}
    for row in sorted(rows, key=lambda r: (r["label"], r["filename"])):
        classes.setdefault(row["label"], []).append(ImageRef(str(folder / "images" / row["filename"])))
    try:
        digest = files_digest(Path(r.name) for refs in classes.values() for r in refs)
    except FileNotFoundError as exc:
        raise DataError(
            f"image {exc.filename} listed in {table} not found: restore it into {folder / 'images'}/."
        ) from exc
    return classes, [file_identity(table), digest]


def image_classes(folder: Path, part: str) -> tuple[str, dict[str, list[ImageRef]], list] | None:
    """(layout, wnid -> image refs, identity) of one part from the first image layout present, or None."""
    if (folder / part).is_dir():
        return ("folders", *_folder_source(folder / part))
    if (folder / f"images_{part}.zip").is_file():
        return ("zips", *_zip_source(folder / f"images_{part}.zip"))
    if (folder / "images").is_dir():
        return ("flat", *_flat_source(folder, part))
    return None


def _read_pickle(path: Path) -> tuple[np.ndarray, dict]:
    """`image_data` and `class_dict` of a mini-imagenet-cache pickle, checked; DataError when unusable."""
    data = read_pickle(path)
    try:
        images, class_dict = data["image_data"], dict(data["class_dict"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} holds no `image_data` and `class_dict` ({exc}): replace it with an intact copy.") from exc
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: image_data must be an N x H x W x 3 uint8 array; replace the file.")
    for wnid, rows in class_dict.items():
        if len(rows) and (min(rows) < 0 or max(rows) >= len(images)):
            raise DataError(
                f"{path}: class_dict[{wnid!r}] has row indices outside 0..{len(images) - 1}; replace the file."
            )
    return images, class_dict


def _cache_pickle(path: Path, cache_dir: Path, name: str, key: dict, image_size: int) -> tuple[np.ndarray, dict]:
    """Convert a mini-imagenet-cache pickle into a cache of [classes, per_class, 3, size, size]."""
    images, class_dict = _read_pickle(path)
    per_class = check_equal_counts(class_dict, str(path))
    names = sorted(class_dict)

    def fill(out: np.ndarray) -> None:
        for c, wnid in enumerate(tqdm(names, desc=f"caching {path.name}", unit="class", mininterval=1.0)):
            out[c] = arrays_to_chw(images[np.asarray(class_dict[wnid])], image_size)

    shape = (len(names), per_class, 3, image_size, image_size)
    return write_cache(cache_dir, name, key, shape, fill, info={"classes": names})


def load_part(root: Path, part: str, image_size: int, cache_dir: Path) -> SplitImages:
    """One part of miniImageNet from the first layout present, through its cache."""
    folder = root / "miniimagenet"
    name = cache_name("miniimagenet", part, image_size, root)
    key = {"dataset": "miniimagenet", "part": part, "image_size": image_size}
    found = image_classes(folder, part)
    if found is not None:
        layout, classes, identity = found
        per_class = check_equal_counts(classes, f"miniImageNet {part} ({layout} in {folder})")
        names = sorted(classes)
        key |= {"layout": layout, "source": identity, "classes": names}
        shape = (len(names), per_class, 3, image_size, image_size)
        array, info = cached(
            cache_dir,
            name,
            key,
            shape,
            lambda out: decode_classes([classes[n] for n in names], out, "RGB", desc=f"caching miniImageNet {part}"),
            info={"classes": names},
        )
    else:
        pickled = folder / f"mini-imagenet-cache-{PICKLE_PART[part]}.pkl"
        if not pickled.is_file():
            raise DataError(
                f"miniImageNet {part} split not found in {folder}: expected one of {part}/<wnid>/*.jpg, "
                f"images_{part}.zip, images/ plus splits/{part}.csv, or {pickled.name} (see README, Data)."
            )
        key |= {"layout": "pickle", "source": file_identity(pickled)}
        hit = load_cache(cache_dir, name, key)
        array, info = hit if hit is not None else _cache_pickle(pickled, cache_dir, name, key, image_size)
    return SplitImages.dense(info["classes"], array)


def load_miniimagenet(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of miniImageNet under `root`/miniimagenet, decoding into `cache_dir` on first use.

    `split` is always "ravi" (the only split) and `download` unsupported; both exist so that every data
    set has the same loader signature.
    """
    if not (root / "miniimagenet").is_dir():
        raise DataError(
            f"miniImageNet folder {root / 'miniimagenet'} not found: point paths.data_dir (DATA_DIR) at the folder "
            "holding miniimagenet/ (see README, Data); it cannot be downloaded automatically."
        )
    return {part: load_part(root, part, image_size, cache_dir) for part in PARTS}
