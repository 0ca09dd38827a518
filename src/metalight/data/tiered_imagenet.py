"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 categories, 351/97/160 classes (20/6/8 categories), 84x84.

Layouts under `<root>/tiered_imagenet` (or `<root>/tiered-imagenet`), tried in this order for each part
(train, val, test):
1. `<part>_images.npz` + `<part>_labels.pkl`: the decompressed arrays (`images`, N x 84 x 84 x 3 uint8,
   in OpenCV's BGR order) of Ren et al.'s code, also what the MetaOptNet/FEAT copies hold;
2. `<part>_images_png.pkl` + `<part>_labels.pkl`: Ren et al.'s download (tiered-imagenet.tar), a pickled
   list of PNG-encoded images;
3. per-class folders `<part>/<wnid>/*.jpg|png` (e.g. ImageNet's train folder linked as train/, val/
   and test/): the classes of the shipped split lists (splits/tiered_imagenet/, Ren et al.'s csv files)
   are read, other folders ignored.
A labels pickle is a dict with `label_specific` (one class index per image) and `label_specific_str`
(class names) as Ren et al. write it, or `labels` as the MetaOptNet copy does.

Both arrays are streamed into the cache (the npz member in chunks, the pickle opcode by opcode with
pickletools), so the 16 GB training split is never held in memory. The npz arrays are flipped from BGR
to RGB, so the three layouts of the same images give the same cache. Classes are ordered by label
(wnid for folders), images by their order in the file (name for folders).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from metalight.data.cache import cache_name, cached_grouped
from metalight.data.class_lists import PARTS, packaged, packaged_path
from metalight.data.images import (
    SplitImages,
    arrays_to_chw,
    class_folders,
    decode_images,
    file_identity,
    files_digest,
    read_pickle,
    to_chw,
)
from metalight.errors import DataError

SPLITS = ("ren",)
FOLDER_NAMES = ("tiered_imagenet", "tiered-imagenet")
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG
CHUNK = 1024  # images per read from an npz


def _plain_key(key: object) -> str:
    """A dict key of a Python 2 or 3 pickle as str."""
    return key.decode("latin-1") if isinstance(key, bytes) else str(key)


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Class index of every image [N] and the name of each class index (Ren et al.'s or MetaOptNet's labels pickle)."""
    data = read_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a labels dict (`label_specific` or `labels`): replace it with an intact copy.")
    data = {_plain_key(k): v for k, v in data.items()}
    labels = data.get("label_specific", data.get("labels"))
    if labels is None:
        raise DataError(f"{path} has neither `label_specific` nor `labels`: replace it with an intact copy.")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: the labels are not whole numbers ({exc}); replace the file.") from exc
    if labels.min(initial=0) < 0:
        raise DataError(f"{path}: negative labels; replace the file.")
    ids = np.unique(labels).tolist()
    names = [str(i) for i in ids]
    strings = data.get("label_specific_str")
    if strings is not None:
        texts = [_plain_key(s) for s in strings]
        if max(ids, default=-1) < len(texts) and len({texts[i] for i in ids}) == len(ids):
            names = [texts[i] for i in ids]
    return np.searchsorted(np.asarray(ids), labels), names


def _npz_chunks(path: Path) -> Iterator[np.ndarray]:
    """The `images` array of an npz, N x H x W x 3 uint8, in chunks of CHUNK rows, never whole in memory."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = "images.npy" if "images.npy" in zf.namelist() else None
            if member is None:
                raise DataError(f"{path} has no `images` array: replace it with an intact copy.")
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read_header:
                    raise DataError(f"{path}: images.npy has format version {version}, not 1.0 or 2.0; re-save it with numpy.")
                shape, fortran, dtype = read_header[version](f)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                    raise DataError(f"{path}: `images` must be an N x H x W x 3 uint8 array (C order); it is {shape} {dtype}.")
                row = int(np.prod(shape[1:]))
                for first in range(0, shape[0], CHUNK):
                    n = min(CHUNK, shape[0] - first)
                    data = f.read(n * row)
                    if len(data) != n * row:
                        raise DataError(f"{path} is truncated ({first + len(data) // row} of {shape[0]} images): replace it.")
                    yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}): replace it with an intact copy.") from exc


def _pickled_images(path: Path) -> Iterator[bytes]:
    """The encoded images (PNG or JPEG bytes) of a pickled list, in order, one at a time (pickletools, no unpickling)."""
    try:
        with path.open("rb") as f:
            for _, arg, _ in pickletools.genops(f):
                if isinstance(arg, str) and arg.startswith(("\x89PNG\r\n\x1a\n", "\xff\xd8\xff")):
                    yield arg.encode("latin-1")  # Python 2 str, or bytes pickled by protocol 2: latin-1 text
                elif isinstance(arg, (bytes, bytearray)) and bytes(arg[:8]).startswith(IMAGE_SIGNATURES):
                    yield bytes(arg)
    except (OSError, ValueError, UnicodeEncodeError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}): replace it with an intact copy.") from exc


def _stream_fill(out: np.ndarray, labels: np.ndarray, images: Path, npz: bool, desc: str) -> None:
    """Write image i of the file to its class-grouped row of `out`, streaming; DataError if the counts disagree."""
    destination = np.empty(len(labels), np.int64)
    destination[np.argsort(labels, kind="stable")] = np.arange(len(labels))
    size, seen = out.shape[-1], 0
    with tqdm(total=len(labels), desc=desc, unit="img", mininterval=1.0) as bar:
        if npz:
            for chunk in _npz_chunks(images):
                end = min(seen + len(chunk), len(labels))
                out[destination[seen:end]] = arrays_to_chw(np.ascontiguousarray(chunk[: end - seen, :, :, ::-1]), size)
                seen += len(chunk)
                bar.update(len(chunk))
        else:
            for encoded in _pickled_images(images):
                if seen < len(labels):
                    try:
                        with Image.open(io.BytesIO(encoded)) as img:
                            out[destination[seen]] = to_chw(img, "RGB", size)
                    except (OSError, SyntaxError, ValueError) as exc:
                        raise DataError(f"image {seen} of {images} cannot be decoded ({exc}): replace the file.") from exc
                seen += 1
                bar.update(1)
    if seen != len(labels):
        raise DataError(
            f"{images} holds {seen} images but its labels file lists {len(labels)}: the two files do not belong "
            "together; replace them with an intact pair."
        )


def _folder_part(folder: Path, part: str, image_size: int, cache_dir: Path, root: Path) -> SplitImages:
    """One part from per-class folders `<part>/<wnid>/`, picking the shipped list's classes."""
    found = class_folders(folder / part)
    wnids = packaged("tiered_imagenet", part)
    missing = [w for w in wnids if not found.get(w)]
    if missing:
        raise DataError(
            f"tieredImageNet {part} class {missing[0]} has no images in {folder / part}/ ({len(missing)} of the "
            f"{len(wnids)} classes of {packaged_path('tiered_imagenet', part)} are missing): add those class folders."
        )
    refs = [ref for w in wnids for ref in found[w]]
    key = {"dataset": "tiered_imagenet", "part": part, "layout": "folders", "image_size": image_size}
    key["source"] = [str((folder / part).resolve()), files_digest(Path(r.name) for r in refs)]
    return cached_grouped(
        cache_dir, cache_name("tiered_imagenet", part, image_size, root), key, wnids, [len(found[w]) for w in wnids],
        (3, image_size, image_size), lambda out: decode_images(refs, out, "RGB", desc=f"caching tieredImageNet {part}"),
    )


def load_part(root: Path, part: str, image_size: int, cache_dir: Path) -> SplitImages:
    """One part of tieredImageNet from the first layout present, through its cache."""
    folder = next((root / n for n in FOLDER_NAMES if (root / n).is_dir()), root / FOLDER_NAMES[0])
    labels_file = folder / f"{part}_labels.pkl"
    for images, npz in ((folder / f"{part}_images.npz", True), (folder / f"{part}_images_png.pkl", False)):
        if images.is_file() and labels_file.is_file():
            labels, names = read_labels(labels_file)
            key = {"dataset": "tiered_imagenet", "part": part, "image_size": image_size, "layout": images.name}
            key["source"] = [file_identity(images), file_identity(labels_file)]
            return cached_grouped(
                cache_dir, cache_name("tiered_imagenet", part, image_size, root), key, names,
                np.bincount(labels, minlength=len(names)).tolist(), (3, image_size, image_size),
                lambda out: _stream_fill(out, labels, images, npz, f"caching tieredImageNet {part}"),
            )
    if (folder / part).is_dir():
        return _folder_part(folder, part, image_size, cache_dir, root)
    raise DataError(
        f"tieredImageNet {part} split not found in {folder}: expected {part}_images.npz or {part}_images_png.pkl "
        f"with {part}_labels.pkl, or per-class folders {part}/<wnid>/ (see README, Data)."
    )


def load_tiered_imagenet(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of tieredImageNet under `root`/tiered_imagenet, decoded into `cache_dir` on first use."""
    return {part: load_part(root, part, image_size, cache_dir) for part in PARTS}
