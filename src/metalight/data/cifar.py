"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100's 100 classes.

Source: torchvision's CIFAR-100 python files in `<root>/cifar100/cifar-100-python/`: `train` and `test`,
pickled dicts with `data` ([N, 3072] uint8 rows: the R, G and B planes of a 32x32 image), `fine_labels`
and `coarse_labels`; `meta`, with `fine_label_names` and `coarse_label_names`. When they are missing and
data.download=true, torchvision's checksum-verified helper fetches and unpacks `cifar-100-python.tar.gz`
there. Before a cache is built, the three files are checked against torchvision's md5 sums
(data.source.checksum=false skips that, for a copy you changed on purpose).

All 100 classes are decoded once into one cache: class c (fine-label order) holds its images of the
`train` file, then those of the `test` file, in file order (600 per class in the real files). CIFAR-FS
takes its classes by fine name (splits/cifar_fs/: 64/16/20 classes), FC100 by superclass (splits/fc100/:
12/4/4 superclasses = 60/20/20 classes). Images are 32x32 RGB, resized when image_size is not 32.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from metalight.data.cache import cache_name, load_cache, write_cache
from metalight.data.class_lists import PARTS, packaged, packaged_path
from metalight.data.images import SplitImages, arrays_to_chw, file_identity, read_pickle
from metalight.errors import DataError

CIFAR_FS_SPLITS = ("bertinetto",)
FC100_SPLITS = ("oreshkin",)
OPTIONS = ("checksum",)


def _expected_files() -> list[tuple[str, str]]:
    """(file name, md5) of the three CIFAR-100 python files, as torchvision knows them."""
    from torchvision.datasets import CIFAR100

    return [*(tuple(f) for f in CIFAR100.train_list), *(tuple(f) for f in CIFAR100.test_list),
            (CIFAR100.meta["filename"], CIFAR100.meta["md5"])]


def cifar_folder(root: Path, download: bool) -> Path:
    """`<root>/cifar100/cifar-100-python`, fetched first (torchvision, md5-checked) when missing and `download` is set."""
    from torchvision.datasets import CIFAR100, utils

    parent = root / "cifar100"
    folder = parent / CIFAR100.base_folder
    missing = [name for name, _ in _expected_files() if not (folder / name).is_file()]
    if not missing:
        return folder
    if not download:
        raise DataError(
            f"CIFAR-100 file {folder / missing[0]} not found: place torchvision's cifar-100-python/ folder "
            f"(train, test, meta) in {parent}, point DATA_DIR (paths.data_dir) at the folder holding cifar100/, "
            "or set data.download=true."
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
        utils.download_and_extract_archive(CIFAR100.url, str(parent), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        (parent / CIFAR100.filename).unlink(missing_ok=True)
        raise DataError(
            f"could not download {CIFAR100.url} into {parent} ({exc}): download it yourself and unpack it there "
            "(it holds cifar-100-python/), or point DATA_DIR (paths.data_dir) at a folder holding cifar100/."
        ) from exc
    return folder


def _verify(folder: Path) -> None:
    """DataError naming the first of the three files whose md5 is not torchvision's."""
    from torchvision.datasets import utils

    for name, md5 in _expected_files():
        if not utils.check_integrity(str(folder / name), md5):
            raise DataError(
                f"{folder / name} does not match torchvision's CIFAR-100 checksum (md5 {md5}): it is damaged or "
                f"another file. Delete {folder} and rerun with data.download=true to fetch it again, or set "
                "data.source.checksum=false to use this copy anyway."
            )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3], fine labels [N] and coarse labels [N] of a CIFAR-100 `train` or `test` file."""
    data = read_pickle(path)
    try:
        rows = np.asarray(data["data"], dtype=np.uint8)  # type: ignore[index]
        fine = np.asarray(data["fine_labels"], dtype=np.int64)  # type: ignore[index]
        coarse = np.asarray(data["coarse_labels"], dtype=np.int64)  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR-100 python file (no {exc}): replace it with an intact copy.") from exc
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or len(fine) != len(rows) or len(coarse) != len(rows):
        raise DataError(f"{path}: `data` must be N x 3072 with one fine and one coarse label per row; replace the file.")
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine, coarse


def _read_all(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Every image [N, 32, 32, 3] grouped by fine class (train file first), counts, fine names, superclass of each class."""
    meta = read_pickle(folder / "meta")
    try:
        fine_names = [str(n) for n in meta["fine_label_names"]]  # type: ignore[index]
        coarse_names = [str(n) for n in meta["coarse_label_names"]]  # type: ignore[index]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{folder / 'meta'} has no {exc}: replace it with an intact copy.") from exc
    batches = [_read_batch(folder / name) for name in ("train", "test")]
    images = np.concatenate([b[0] for b in batches])
    fine = np.concatenate([b[1] for b in batches])
    coarse = np.concatenate([b[2] for b in batches])
    if fine.min(initial=0) < 0 or fine.max(initial=0) >= len(fine_names) or coarse.max(initial=0) >= len(coarse_names):
        raise DataError(f"labels in {folder} fall outside the class names of its meta file: replace the files.")
    superclass = []
    for c in range(len(fine_names)):
        parents = set(coarse[fine == c].tolist())
        if len(parents) > 1:
            raise DataError(f"class {fine_names[c]!r} in {folder} has several superclasses {sorted(parents)}: replace the files.")
        superclass.append(coarse_names[parents.pop()] if parents else "")
    order = np.argsort(fine, kind="stable")
    return images[order], np.bincount(fine, minlength=len(fine_names)), fine_names, superclass


def load_cifar100(root: Path, image_size: int, cache_dir: Path, download: bool, checksum: bool) -> tuple[SplitImages, list[str]]:
    """All 100 CIFAR-100 classes as one SplitImages (through the cache), and the superclass of each class."""
    folder = cifar_folder(root, download)
    key = {
        "dataset": "cifar100",
        "image_size": image_size,
        "source": [file_identity(folder / name) for name, _ in _expected_files()],
    }
    name = cache_name("cifar100", "classes", image_size, root)
    hit = load_cache(cache_dir, name, key)
    if hit is None:
        if checksum:
            _verify(folder)
        images, counts, classes, superclass = _read_all(folder)

        def fill(out: np.ndarray) -> None:
            for first in range(0, len(images), 4096):
                out[first : first + 4096] = arrays_to_chw(images[first : first + 4096], image_size)

        info = {"classes": classes, "counts": counts.tolist(), "superclasses": superclass}
        hit = write_cache(cache_dir, name, key, (len(images), 3, image_size, image_size), fill, info)
    array, info = hit
    return SplitImages.grouped(info["classes"], array, info["counts"]), info["superclasses"]


def _check_names(names: list[str], known: list[str], split: str, part: str, root: Path) -> None:
    """DataError when a shipped class list names something the CIFAR-100 files do not have."""
    missing = sorted(set(names) - set(known))
    if missing:
        raise DataError(
            f"{missing[0]!r} of the shipped {split} {part} list ({packaged_path(split, part)}) is not a class "
            f"name of the files in {root / 'cifar100'}: they are not CIFAR-100; replace them with torchvision's copy."
        )


def load_cifar_fs(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False, checksum: bool = True
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of CIFAR-FS (Bertinetto et al. 2019: 64/16/20 CIFAR-100 classes, shipped lists)."""
    classes, _ = load_cifar100(root, image_size, cache_dir, download, checksum)
    parts = {part: packaged("cifar_fs", part) for part in PARTS}
    for part, names in parts.items():
        _check_names(names, classes.classes, "cifar_fs", part, root)
    return {part: classes.subset(names) for part, names in parts.items()}


def load_fc100(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False, checksum: bool = True
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of FC100 (Oreshkin et al. 2018: the classes of 12/4/4 CIFAR-100 superclasses)."""
    classes, superclass = load_cifar100(root, image_size, cache_dir, download, checksum)
    out = {}
    for part in PARTS:
        wanted = packaged("fc100", part)
        _check_names(wanted, sorted(set(superclass)), "fc100", part, root)
        out[part] = classes.subset([c for c, s in zip(classes.classes, superclass) if s in wanted])
    return out
