"""Image files in folders or zip archives: listing them, fingerprinting them and decoding them to uint8."""

from __future__ import annotations

import hashlib
import io
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
    """One split of a data set: class names and their images, [classes, per_class, C, H, W] uint8."""

    classes: list[str]
    images: np.ndarray


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


def decode_classes(
    classes: Sequence[Sequence[ImageRef]], out: np.ndarray, mode: str, invert: bool = False, desc: str = "decoding"
) -> None:
    """Decode image j of class c into out[c, j] ([classes, per_class, C, H, W] uint8), with a progress bar.

    Raises DataError naming the file when an image cannot be read or decoded.
    """
    size = out.shape[-1]
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        with tqdm(total=sum(len(refs) for refs in classes), desc=desc, unit="img", mininterval=1.0) as bar:
            for c, refs in enumerate(classes):
                for j, ref in enumerate(refs):
                    try:
                        if ref.archive is None:
                            data = Path(ref.name).read_bytes()
                        else:
                            if ref.archive not in archives:
                                archives[ref.archive] = zipfile.ZipFile(ref.archive)
                            data = archives[ref.archive].read(ref.name)
                        with Image.open(io.BytesIO(data)) as img:
                            out[c, j] = to_chw(img, mode, size, invert)
                    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
                        raise DataError(
                            f"cannot read image {ref} ({type(exc).__name__}: {exc}): the file is corrupt or "
                            "unreadable; replace it (or the archive holding it) with an intact copy."
                        ) from exc
                bar.update(len(refs))
    finally:
        for zf in archives.values():
            zf.close()


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

