"""Omniglot (Lake et al. 2015): character images from the two archives, and the Vinyals and Lake splits.

Layout under `<root>/omniglot`: `images_background` and `images_evaluation`, each either the unpacked
folder or the zip (`<Alphabet>/characterNN/XXXX_YY.png`, read straight from the archive). The Vinyals
split's class lists ship with metalight (splits/omniglot_vinyals/, see splits/README.md); a folder
`splits/vinyals/` holding `{train,val,test}.txt` there is used instead when it exists.

Images: each 105x105 drawing is resized to image_size x image_size with antialiasing (PIL LANCZOS) and
inverted, so strokes are bright (255) on a dark background (0).

Splits:
- "vinyals": the split of Vinyals et al. (2016) as used by Prototypical Networks; each line
  `Alphabet/characterNN/rotDDD` is a class of its own, the character rotated DDD degrees counterclockwise:
  1028/172/423 characters x 4 rotations = 4112/688/1692 classes.
- "lake": the original protocol: evaluation alphabets (659 characters) for testing, background alphabets
  for training, minus the five background alphabets in LAKE_VAL_ALPHABETS (158 characters) held out for
  validation: 806/158/659 classes, no rotations.
- "lake_rotated": the "lake" split whose training characters also count rotated by 90, 180 and 270 degrees
  as classes of their own (Vinyals et al.'s way of growing the training classes): 3224/158/659 classes. Only
  training grows: validation and test, and Lake's one-shot runs, keep the upright drawings.

All 1623 characters are decoded once into one cache shared by both splits; rotations are applied when a
split is loaded (np.rot90, cheap).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from metalight.data.cache import cache_name, cached
from metalight.data.class_lists import packaged_path, read_class_list
from metalight.data.download import download_checked
from metalight.data.images import (
    ImageRef,
    SplitImages,
    check_equal_counts,
    decode_classes,
    file_identity,
    files_digest,
    zip_images,
)
from metalight.errors import DataError

SPLITS = ("vinyals", "lake", "lake_rotated")
INVERT = True  # strokes bright (255) on a dark background (0): the files hold dark strokes on white
ARCHIVES = ("images_background", "images_evaluation")
LAKE_VAL_ALPHABETS = (
    "Balinese",
    "Early_Aramaic",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Mkhedruli_(Georgian)",
    "Tifinagh",
)
_ROTATION = re.compile(r"rot(\d{3})")


def download_archive(folder: Path, archive: str) -> None:
    """Fetch the official `<archive>.zip` into folder, checked against torchvision's md5 of it."""
    from torchvision.datasets import Omniglot

    filename = f"{archive}.zip"
    download_checked(f"{Omniglot.download_url_prefix}/{filename}", folder, filename, Omniglot.zips_md5[archive])


def list_characters(folder: Path, download: bool = False) -> tuple[dict[str, list[ImageRef]], dict[str, str], list]:
    """Every character `Alphabet/characterNN` -> its image refs, the archive each comes from, and a source identity.

    Reads each archive from its folder when unpacked, else from its zip; a missing one is downloaded when
    `download` is set, else DataError.
    """
    characters: dict[str, list[ImageRef]] = {}
    archive_of: dict[str, str] = {}
    identity: list = []
    for archive in ARCHIVES:
        unpacked, packed = folder / archive, folder / f"{archive}.zip"
        if unpacked.is_dir():
            files = sorted(unpacked.glob("*/*/*.png"))
            refs = [(f"{f.parent.parent.name}/{f.parent.name}", ImageRef(str(f))) for f in files]
            identity.append([str(unpacked.resolve()), files_digest(files)])
        else:
            if not packed.is_file():
                if not download:
                    raise DataError(
                        f"Omniglot archive not found: neither {unpacked}/ nor {packed} exists. Point "
                        "DATA_DIR (or paths.data_dir=...) at the folder holding your omniglot/ copy, place "
                        f"{archive}.zip (or its unpacked folder) there, or set data.download=true."
                    )
                download_archive(folder, archive)
            names = zip_images(packed)
            refs = [("/".join(name.split("/")[-3:-1]), ImageRef(name, packed)) for name in names]
            identity.append(file_identity(packed))
        if not refs:
            raise DataError(f"no .png images found in {unpacked if unpacked.is_dir() else packed}: replace it.")
        for character, ref in refs:
            characters.setdefault(character, []).append(ref)
            archive_of[character] = archive
    return characters, archive_of, identity


def vinyals_file(folder: Path, part: str) -> Path:
    """splits/vinyals/<part>.txt under the Omniglot folder when that folder has splits/vinyals/, else the shipped copy."""
    user = folder / "splits" / "vinyals"
    if not user.is_dir():
        return packaged_path("omniglot_vinyals", part)
    path = user / f"{part}.txt"
    if not path.is_file():
        raise DataError(
            f"Vinyals split file {path} not found, but its folder exists, so it replaces the copy shipped with "
            f"metalight: restore {{train,val,test}}.txt there (Prototypical Networks repository, "
            f"data/omniglot/splits/vinyals/), or remove {user}/ to use the shipped lists."
        )
    return path


def _vinyals_classes(folder: Path, part: str, known: dict[str, list[ImageRef]]) -> list[tuple[str, str, int]]:
    """(class name, character, quarter turns) per line of the Vinyals list of `part`, each checked for images."""
    path = vinyals_file(folder, part)
    classes = []
    for number, line in read_class_list(path):
        character, _, rotation = line.rpartition("/")
        match = _ROTATION.fullmatch(rotation)
        if not match or int(match[1]) % 90 or int(match[1]) >= 360:
            raise DataError(
                f"{path}:{number}: {line!r} is not `Alphabet/characterNN/rotDDD` with DDD in 000/090/180/270: "
                "fix the line or restore the original split file."
            )
        if character not in known:
            raise DataError(
                f"class {line!r} of {path} has no images: {character} is in neither images_background "
                "nor images_evaluation; restore the archives or the original split file."
            )
        classes.append((line, character, int(match[1]) // 90))
    return classes


def _lake_classes(archive_of: dict[str, str], rotate_train: bool) -> dict[str, list[tuple[str, str, int]]]:
    """Train/val/test classes of the Lake protocol: background alphabets (some held out for val) vs evaluation.

    rotate_train: each training character also gives three rotated classes, `<character>/rotDDD`.
    """
    parts: dict[str, list[tuple[str, str, int]]] = {"train": [], "val": [], "test": []}
    for character in sorted(archive_of):
        if archive_of[character] == "images_evaluation":
            part = "test"
        else:
            part = "val" if character.split("/")[0] in LAKE_VAL_ALPHABETS else "train"
        parts[part].append((character, character, 0))
        if part == "train" and rotate_train:
            parts[part] += [(f"{character}/rot{90 * k:03d}", character, k) for k in (1, 2, 3)]
    return parts


def _split_images(base: np.ndarray, index: dict[str, int], classes: list[tuple[str, str, int]]) -> SplitImages:
    """The classes (name, character, quarter turns) of one split as an in-memory array, rotations applied."""
    turns = np.array([k for _, _, k in classes])
    images = base[[index[c] for _, c, _ in classes]].view(np.ndarray)
    for k in (1, 2, 3):
        rows = turns == k
        images[rows] = np.rot90(images[rows], k, axes=(-2, -1))
    return SplitImages.dense([name for name, _, _ in classes], images)


def load_omniglot(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of Omniglot under `root`/omniglot, decoding into `cache_dir` on first use."""
    folder = root / "omniglot"
    characters, archive_of, identity = list_characters(folder, download)
    if split == "vinyals":
        parts = {part: _vinyals_classes(folder, part, characters) for part in ("train", "val", "test")}
    else:
        parts = _lake_classes(archive_of, rotate_train=split == "lake_rotated")
    per_class = check_equal_counts(characters, f"Omniglot in {folder}")
    names = sorted(characters)
    key = {
        "dataset": "omniglot",
        "image_size": image_size,
        "sources": identity,
        "characters": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }
    base, _ = cached(
        cache_dir,
        cache_name("omniglot", "characters", image_size, root),
        key,
        (len(names), per_class, 1, image_size, image_size),
        lambda out: decode_classes([characters[n] for n in names], out, "L", invert=INVERT, desc="caching Omniglot"),
    )
    index = {name: i for i, name in enumerate(names)}
    return {part: _split_images(base, index, classes) for part, classes in parts.items()}
