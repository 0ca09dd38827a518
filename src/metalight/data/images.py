"""Image files in folders or zip archives: listing them, fingerprinting them and decoding them to uint8."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from metalight.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SplitImages:
    """One split of a data set: class c is `classes[c]`, its images `images[starts[c] : starts[c] + counts[c]]`.

    `images` is [n_images, C, H, W] uint8 (often a memory-mapped cache shared by several splits), so
    classes may hold different numbers of images (CUB, tieredImageNet, your own folders).
    """

    classes: list[str]
    images: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def dense(cls, classes: list[str], images: np.ndarray) -> SplitImages:
        """A split stored as [classes, per_class, C, H, W] (every class the same count), viewed flat."""
        n_classes, per_class = images.shape[:2]
        return cls(
            classes=list(classes),
            images=images.reshape(n_classes * per_class, *images.shape[2:]),
            starts=np.arange(n_classes, dtype=np.int64) * per_class,
            counts=np.full(n_classes, per_class, dtype=np.int64),
        )

    @classmethod
    def grouped(cls, classes: list[str], images: np.ndarray, counts: Sequence[int]) -> SplitImages:
        """A flat [n_images, C, H, W] array holding class 0's images, then class 1's, ... (`counts` of each)."""
        counts = np.asarray(counts, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(classes=list(classes), images=images, starts=starts, counts=counts)

    def joined(self, other: SplitImages) -> SplitImages:
        """This split's classes, then `other`'s: one array when both share it (a cache), else a copy of both."""
        if other.images is self.images:
            images, other_starts = self.images, other.starts
        else:
            images, other_starts = np.concatenate([self.images, other.images]), other.starts + len(self.images)
        return SplitImages(
            self.classes + other.classes, images, np.concatenate([self.starts, other_starts]), np.concatenate([self.counts, other.counts])
        )

    def subset(self, names: Sequence[str]) -> SplitImages:
        """The classes `names` (in that order) of this split, sharing its image array."""
        index = {name: c for c, name in enumerate(self.classes)}
        rows = np.array([index[name] for name in names], dtype=np.int64)
        return SplitImages(list(names), self.images, self.starts[rows], self.counts[rows])


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a file path, or a member `name` of the zip archive `archive`."""

    name: str
    archive: Path | None = None

    def __str__(self) -> str:
        return f"{self.archive}::{self.name}" if self.archive else self.name


def zip_images(archive: Path) -> list[str]:
    """Member names of the image files inside a zip archive, sorted; DataError if it is not a readable zip."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot open the zip archive {archive} ({exc}): replace it with an intact copy.") from exc
    return sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))


def folder_images(folder: Path) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folders(directory: Path) -> dict[str, list[ImageRef]]:
    """The classes of a `<class>/<image files>` folder: class folder name -> its images, both sorted by name."""
    return {d.name: [ImageRef(str(f)) for f in folder_images(d)] for d in sorted(directory.iterdir()) if d.is_dir()}


def read_pickle(path: Path) -> object:
    """The object pickled in `path` (Python 2 pickles too, read as latin1); DataError naming the file when unreadable."""
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # unpickling a damaged file can raise nearly any exception type
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}): replace it with an intact copy.") from exc


def file_identity(path: Path) -> list:
    """What identifies a source file for a cache: absolute path, size and modification time."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def files_digest(paths: Iterable[Path]) -> str:
    """One sha256 over the identities (path, size, mtime) of many files: a folder tree's fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(repr(file_identity(path)).encode())
    return digest.hexdigest()


def to_chw(img: Image.Image, mode: str, size: int, invert: bool = False) -> np.ndarray:
    """A PIL image as a [C, size, size] uint8 array in mode `mode` ("L" or "RGB"), resized with antialiasing."""
    img = img.convert(mode)
    if img.size != (size, size):
        # every PIL filter but NEAREST antialiases when shrinking; LANCZOS is the sharpest of them
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.uint8)
    if invert:
        array = 255 - array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def arrays_to_chw(rows: np.ndarray, size: int, mode: str = "RGB") -> np.ndarray:
    """Decoded images [n, H, W, C] (or [n, H, W]) uint8 as [n, C, size, size]: transposed, resized with to_chw if needed."""
    if rows.shape[1:3] == (size, size):
        return rows[:, None] if rows.ndim == 3 else rows.transpose(0, 3, 1, 2)
    return np.stack([to_chw(Image.fromarray(row), mode, size) for row in rows])


Box = tuple[float, float, float, float]
# PIL modes whose images hold one intensity per pixel; every other mode (RGB, RGBA, P, CMYK, ...) is colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


def mode_family(mode: str) -> str:
    """'grey' or 'colour': what an image of PIL mode `mode` holds."""
    return "grey" if mode in GREY_MODES or mode.startswith("I;") else "colour"


class _Reader:
    """Bytes of image files and zip members, keeping each zip archive open while it is read."""

    def __init__(self) -> None:
        self.archives: dict[Path, zipfile.ZipFile] = {}

    def read(self, ref: ImageRef) -> bytes:
        """The file's bytes."""
        if ref.archive is None:
            return Path(ref.name).read_bytes()
        if ref.archive not in self.archives:
            self.archives[ref.archive] = zipfile.ZipFile(ref.archive)
        return self.archives[ref.archive].read(ref.name)

    def close(self) -> None:
        """Close every archive opened so far."""
        for zf in self.archives.values():
            zf.close()


def decode_images(
    refs: Sequence[ImageRef],
    out: np.ndarray,
    mode: str,
    invert: bool = False,
    desc: str = "decoding",
    boxes: Sequence[Box] | None = None,
    mixed_modes_fix: str | None = None,
    progress: bool = True,
) -> None:
    """Decode image i of `refs` into out[i] ([n, C, H, W] uint8), with a progress bar unless `progress` is false.

    boxes[i] = (x, y, width, height) crops image i before it is resized. With `mixed_modes_fix`, grey and
    colour files must not mix: DataError naming one of each, ending with that fix. Raises DataError
    naming the file when an image cannot be read or decoded.
    """
    size = out.shape[-1]
    reader = _Reader()
    first: tuple[ImageRef, str] | None = None
    try:
        for i, ref in enumerate(tqdm(refs, desc=desc, unit="img", mininterval=1.0, disable=not progress)):
            try:
                with Image.open(io.BytesIO(reader.read(ref))) as img:
                    if mixed_modes_fix is not None:
                        first = first or (ref, img.mode)
                        if mode_family(img.mode) != mode_family(first[1]):
                            raise DataError(
                                f"images of mixed modes: {first[0]} is {mode_family(first[1])} (PIL mode "
                                f"{first[1]}) but {ref} is {mode_family(img.mode)} (mode {img.mode}); "
                                f"{mixed_modes_fix}"
                            )
                    if boxes is not None:
                        x, y, w, h = boxes[i]
                        img = img.crop((round(x), round(y), round(x + w), round(y + h)))
                    out[i] = to_chw(img, mode, size, invert)
            except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
                raise DataError(
                    f"cannot read image {ref} ({type(exc).__name__}: {exc}): the file is corrupt or "
                    "unreadable; replace it (or the archive holding it) with an intact copy."
                ) from exc
    finally:
        reader.close()


def decode_classes(
    classes: Sequence[Sequence[ImageRef]], out: np.ndarray, mode: str, invert: bool = False, desc: str = "decoding"
) -> None:
    """Decode image j of class c into out[c, j] ([classes, per_class, C, H, W] uint8): decode_images on the flat view."""
    flat = out.reshape(-1, *out.shape[2:])
    decode_images([ref for refs in classes for ref in refs], flat, mode, invert, desc)


def check_equal_counts(classes: dict[str, Sequence], where: str) -> int:
    """Images per class, when every class has the same number and none is empty; DataError otherwise."""
    for name, refs in classes.items():
        if not refs:
            raise DataError(f"class {name!r} of {where} has no images: restore its images or remove it from the split.")
    counts = {len(refs) for refs in classes.values()}
    if len(counts) != 1:
        smallest = min(classes, key=lambda n: len(classes[n]))
        raise DataError(
            f"classes of {where} hold different numbers of images ({min(counts)}..{max(counts)}, e.g. "
            f"{smallest!r} has {len(classes[smallest])}): every class needs the same count; restore the missing images."
        )
    return counts.pop()



def channel_stats(split: SplitImages) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation, in [0, 1] units, of every image of a split (read in bounded chunks)."""
    channels, pixels = split.images.shape[1], int(np.prod(split.images.shape[2:]))
    chunk = max(1, 2**24 // max(1, channels * pixels))  # images per read: about 16 MB of uint8
    total = np.zeros(channels, np.uint64)
    squares = np.zeros(channels, np.uint64)
    for start, count in zip(split.starts.tolist(), split.counts.tolist()):
        for first in range(start, start + count, chunk):
            block = np.asarray(split.images[first : min(first + chunk, start + count)])
            total += block.sum(axis=(0, 2, 3), dtype=np.uint64)
            squares += np.square(block, dtype=np.uint32).sum(axis=(0, 2, 3), dtype=np.uint64)
    n = float(split.counts.sum()) * pixels
    mean = total.astype(np.float64) / n
    std = np.sqrt(np.maximum(squares.astype(np.float64) / n - mean**2, 0.0))
    return (mean / 255).tolist(), (np.maximum(std, 1e-6) / 255).tolist()
