"""Your own images (`data=folder`): a folder of class folders, or one zip of them, split by class lists or seeded ratios.

Classes: every folder that directly holds image files (png/jpg/jpeg, any size, grey or colour) is a class,
named by its path relative to the root with `/` (Omniglot's `images_background/` gives `Alphabet/characterNN`).
A zip is read as the folder it unpacks to; when all its members sit under one top folder (a zipped
folder), that folder is the root. Hidden files and folders and `__MACOSX/` are skipped. A folder that
holds images and also class folders below it is refused: which images would belong to which class?

Split (data.split):
- `lists`: `train.txt`, `val.txt`, `test.txt` in data.source.lists (null: the root folder, or the folder
  a zip sits in), one class per line (`#` starts a comment); classes in no list are not used.
- `ratios`: the classes sorted by name, shuffled by numpy's default_rng(data.source.split_seed), then cut
  into consecutive parts of data.source.ratios (train, val, test): the same on every run and every rank.
- `auto`: `lists` when the three files are there, else `ratios`.
The split is logged at start.

Images are converted to data.channels (1: grey, 3: RGB) and resized to image_size x image_size (PIL
LANCZOS, no cropping); grey and colour files must not mix unless data.source.mixed_modes=convert. All
classes are decoded once into one cache that every split picks its classes from, so another split (or
seed, or ratio) does not decode anything again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from metalight.data.cache import cache_name, cached_grouped
from metalight.data.class_lists import PARTS, check_disjoint, read_class_list
from metalight.data.images import IMAGE_SUFFIXES, ImageRef, SplitImages, decode_images, file_identity, files_digest, zip_images
from metalight.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("auto", "lists", "ratios")
OPTIONS = ("lists", "ratios", "split_seed", "mixed_modes")
MIXED_MODES = ("error", "convert")
FOLDER_CLASSES = ("class folder", "folder paths relative to the root")  # what a class is, how it is named (messages)


def _skipped(part: str) -> bool:
    """Hidden files and folders, and the resource forks macOS adds to zips."""
    return part.startswith(".") or part == "__MACOSX"


def _folder_classes(root: Path) -> tuple[dict[str, list[ImageRef]], list]:
    """Class (relative folder path) -> sorted image refs of a folder tree, and the tree's identity."""
    classes: dict[str, list[ImageRef]] = {}
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES) and not _skipped(f))
        if images:
            name = Path(here).relative_to(root).as_posix()
            classes[name] = [ImageRef(str(Path(here) / f)) for f in images]
    paths = [Path(ref.name) for refs in classes.values() for ref in refs]
    return classes, [str(root.resolve()), files_digest(paths)]


def _zip_classes(archive: Path) -> tuple[dict[str, list[ImageRef]], list]:
    """Class -> sorted image refs of a zip of class folders (its single top folder stripped), and its identity."""
    names = [n for n in zip_images(archive) if not any(_skipped(part) for part in n.split("/"))]
    tops = {n.split("/")[0] for n in names}
    strip = len(tops) == 1 and all(n.count("/") >= 2 for n in names)  # one top folder, no image directly in it
    classes: dict[str, list[ImageRef]] = {}
    for name in names:
        parent = name.rsplit("/", 1)[0] if "/" in name else "."
        if strip:
            parent = parent.split("/", 1)[1]
        classes.setdefault(parent, []).append(ImageRef(name, archive))
    return classes, file_identity(archive)


def list_classes(root: Path) -> tuple[dict[str, list[ImageRef]], list]:
    """Every class under root (a folder, or a .zip) -> its images, sorted, and root's identity; DataError for an unusable tree."""
    if root.is_dir():
        classes, identity = _folder_classes(root)
    elif root.is_file() and root.suffix.lower() == ".zip":
        classes, identity = _zip_classes(root)
    else:
        raise DataError(
            f"data.root={root} is neither a folder nor a .zip file: point data.root at the folder holding your "
            "class folders (<root>/<class>/<image>.png|jpg), or at a zip of them."
        )
    if not classes:
        raise DataError(
            f"no class folders with images under {root}: data=folder expects <root>/<class>/<image>.png|jpg "
            "(a class is any folder holding image files); point data.root at such a folder or zip."
        )
    if "." in classes:
        raise DataError(
            f"{root} holds images directly ({classes['.'][0]}): every image must sit in a class folder "
            "(<root>/<class>/<image>); move them into one, or point data.root at the folder above."
        )
    names = sorted(classes)
    for name, following in zip(names, names[1:]):
        if following.startswith(f"{name}/"):
            raise DataError(
                f"class folder {name!r} under {root} holds images and also the class folder {following!r}: a "
                f"class must be a folder of images only; move the images of {name!r} into a subfolder."
            )
    return {name: classes[name] for name in names}, identity


def _read_lists(directory: Path, classes: dict[str, list], root: Path, naming: tuple[str, str] = FOLDER_CLASSES) -> dict[str, list[str]]:
    """Classes of train/val/test from `<directory>/<part>.txt`, each checked: it exists, it is listed once, in one part.

    `naming` (what a class is, how it is named) speaks of class folders (the default) or of text labels in messages.
    """
    noun, how = naming
    parts: dict[str, list[str]] = {}
    for part in PARTS:
        path = directory / f"{part}.txt"
        seen: set[str] = set()
        for number, name in read_class_list(path):
            if name not in classes:
                example = next(iter(classes))
                raise DataError(
                    f"{path}:{number}: class {name!r} is not a {noun} under {root}: fix the line (class names are "
                    f"{how}, like {example!r}) or add that {noun}."
                )
            if name in seen:
                raise DataError(f"{path}:{number}: class {name!r} is listed twice: remove one of the lines.")
            seen.add(name)
        parts[part] = sorted(seen)
        if not parts[part]:
            raise DataError(f"{path} lists no class: write one {noun} name per line.")
    check_disjoint(parts, f"the class lists in {directory}")
    return parts


def _ratios(value: object) -> list[float]:
    """data.source.ratios as three non-negative numbers that sum to 1, else ConfigError."""
    numbers = list(value) if isinstance(value, (list, tuple)) else []
    if (
        len(numbers) != 3
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0 for r in numbers)
        or abs(sum(numbers) - 1.0) > 1e-6
    ):
        raise ConfigError(
            f"data.source.ratios={value!r} is not valid: give three numbers >= 0 (train, val, test) that sum "
            "to 1, e.g. data.source.ratios=[0.7,0.15,0.15]."
        )
    return [float(r) for r in numbers]


def ratio_split(names: list[str], ratios: list[float], seed: int) -> dict[str, list[str]]:
    """train/val/test classes: the sorted names shuffled by default_rng(seed), cut at the cumulative ratios."""
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [sorted(names)[i] for i in order]
    cuts = [round(ratios[0] * len(names)), round((ratios[0] + ratios[1]) * len(names))]
    bounds = [0, *cuts, len(names)]
    return {part: sorted(shuffled[bounds[i] : bounds[i + 1]]) for i, part in enumerate(PARTS)}


def choose_split(
    root: Path,
    classes: dict[str, list],
    split: str,
    lists: str | None,
    ratios: object,
    split_seed: object,
    naming: tuple[str, str] = FOLDER_CLASSES,
) -> tuple[dict[str, list[str]], str]:
    """train/val/test class names (of `classes`' keys) and a sentence saying how they were chosen (logged).

    `naming` (what a class is, how it is named) speaks of class folders or of text labels (data=text) in messages.
    """
    directory = Path(lists) if lists else (root if root.is_dir() else root.parent)
    present = [part for part in PARTS if (directory / f"{part}.txt").is_file()]
    if split == "lists" or (split == "auto" and present):
        if len(present) != len(PARTS):
            missing = ", ".join(f"{p}.txt" for p in PARTS if p not in present)
            raise DataError(
                f"class lists incomplete in {directory}: {missing} missing. Write all three (one class per "
                "line), point data.source.lists at the folder holding them, or set data.split=ratios."
            )
        return _read_lists(directory, classes, root, naming), f"by the class lists in {directory}"
    values = _ratios(ratios)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError(f"data.source.split_seed={split_seed!r} is not valid: give a whole number >= 0, e.g. 0.")
    parts = ratio_split(list(classes), values, split_seed)
    for part, names in parts.items():
        if not names:
            raise DataError(
                f"data.source.ratios={values} leaves the {part} split without a class ({len(classes)} classes "
                f"under {root}): raise its ratio, or add classes."
            )
    return parts, f"by data.source.ratios={values} with data.source.split_seed={split_seed}"


def load_folder(
    root: Path,
    split: str,
    image_size: int,
    cache_dir: Path,
    download: bool = False,
    channels: int = 3,
    lists: str | None = None,
    ratios: object = None,
    split_seed: object = None,
    mixed_modes: str = "error",
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of the class folders under root (a folder or a zip), all decoded into one cache."""
    if mixed_modes not in MIXED_MODES:
        raise ConfigError(f"data.source.mixed_modes={mixed_modes!r} is not valid: use error or convert.")
    root = Path(root)
    classes, identity = list_classes(root)
    parts, how = choose_split(root, classes, split, lists, ratios, split_seed)
    log.info(
        "data=folder: %d classes under %s, split %s into %d/%d/%d classes (train/val/test).",
        len(classes), root, how, *(len(parts[p]) for p in PARTS),
    )
    names = list(classes)
    counts = [len(classes[n]) for n in names]
    fix = None
    if mixed_modes == "error":
        fix = (
            f"convert the files to one mode, or set data.source.mixed_modes=convert to convert every image to "
            f"data.channels={channels}."
        )
    # mixed_modes is not part of the key: a build that succeeded under "error" equals one under "convert"
    key = {"dataset": "folder", "image_size": image_size, "channels": channels, "source": identity}
    base = cached_grouped(
        cache_dir,
        cache_name("folder", f"{channels}ch", image_size, root),
        key,
        names,
        counts,
        (channels, image_size, image_size),
        lambda out: decode_images(
            [ref for n in names for ref in classes[n]], out, "L" if channels == 1 else "RGB",
            desc=f"caching {root.name}", mixed_modes_fix=fix,
        ),
    )
    return {part: base.subset(parts[part]) for part in PARTS}
