"""Tiny copies of each data set in its real on-disk format, with pixels that say which class and image they are.

Every image of class c (its index in the set's class order) has red = c and green = its position j in
the class; blue is a constant per writer. Images are written at the size the tests read them (no resize),
so decoded pixels can be checked exactly (JPEG writers use flat colours and are checked with a tolerance).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalight.data.class_lists import PARTS, packaged

SIZE = 8  # pixels of every synthetic image (tests read them at image_size=SIZE)


def coded(c: int, j: int, blue: int = 7, size: int = SIZE) -> np.ndarray:
    """An H x W x 3 uint8 image whose red is c, green j and blue `blue`."""
    image = np.empty((size, size, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = c, j, blue
    return image


def png_bytes(image: np.ndarray) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, counts: dict[str, int], grey: set[str] = frozenset()) -> Path:
    """`<root>/<class path>/<j>.png` for each class (sorted order = code c), `counts` images each; grey classes in mode L."""
    for c, name in enumerate(sorted(counts)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(counts[name]):
            image = Image.fromarray(coded(c, j))
            (image.convert("L") if name in grey else image).save(root / name / f"{j:03d}.png")
    return root


def zip_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    """A zip of every file under folder, its members under `top/` when given (a zipped folder)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                zf.write(path, f"{top}/{name}" if top else name)
    return archive


def cifar_names() -> tuple[list[str], list[str]]:
    """CIFAR-100's fine and coarse class names (alphabetical, as in its meta file), from the shipped lists."""
    fine = sorted(n for part in PARTS for n in packaged("cifar_fs", part))
    coarse = sorted(n for part in PARTS for n in packaged("fc100", part))
    return fine, coarse


def write_cifar100(root: Path, train: int = 2, test: int = 1) -> Path:
    """`<root>/cifar100/cifar-100-python/{train,test,meta}` with `train` + `test` images per fine class.

    Fine class c belongs to superclass c % 20 (five each, as in CIFAR-100, though not CIFAR-100's own pairs);
    blue is 0 in the train file and 1 in the test file.
    """
    folder = root / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names, coarse_names = cifar_names()
    for blue, (name, per_class) in enumerate((("train", train), ("test", test))):
        rows, fine = [], []
        for j in range(per_class):  # file order interleaves classes, as the real files do
            for c in range(len(fine_names)):
                rows.append(coded(c, j, blue, 32).transpose(2, 0, 1).reshape(-1))
                fine.append(c)
        batch = {"data": np.stack(rows), "fine_labels": fine, "coarse_labels": [c % 20 for c in fine], "filenames": []}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, protocol=2))
    return folder


TIERED_COUNTS = {"train": [3, 5, 4, 6], "val": [4, 3, 5], "test": [6, 4, 3, 5]}


def tiered_arrays(part: str) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """RGB images, labels and class names of a tiny tieredImageNet part, classes interleaved in file order."""
    counts = TIERED_COUNTS[part]
    images, labels, seen = [], [], [0] * len(counts)
    while sum(seen) < sum(counts):
        for c, count in enumerate(counts):
            if seen[c] < count:
                images.append(coded(c, seen[c], 9))
                labels.append(c)
                seen[c] += 1
    return images, np.array(labels), [f"{part} class {c}" for c in range(len(counts))]


def write_tiered(root: Path, layout: str) -> Path:
    """`<root>/tiered_imagenet/<part>_labels.pkl` with `<part>_images_png.pkl` (layout "png") or `<part>_images.npz` ("npz").

    As Ren et al. write them: protocol-2 pickles, the PNGs a list of uint8 arrays (cv2.imencode's output),
    the npz arrays in OpenCV's BGR order.
    """
    folder = root / "tiered_imagenet"
    folder.mkdir(parents=True)
    for part in PARTS:
        images, labels, names = tiered_arrays(part)
        meta = {"label_specific": labels, "label_general": labels * 0, "label_specific_str": names, "label_general_str": ["all"]}
        (folder / f"{part}_labels.pkl").write_bytes(pickle.dumps(meta, protocol=2))
        if layout == "png":
            encoded = [np.frombuffer(png_bytes(image), np.uint8).reshape(-1, 1) for image in images]
            (folder / f"{part}_images_png.pkl").write_bytes(pickle.dumps(encoded, protocol=2))
        else:
            np.savez(folder / f"{part}_images.npz", images=np.stack(images)[..., ::-1])
    return folder


def cub_classes() -> list[str]:
    """CUB-200-2011's 200 class names in id order, from the shipped lists."""
    return sorted(n for part in PARTS for n in packaged("cub", part))


def write_cub(root: Path, per_class: int = 3, grey_class: int = 5) -> Path:
    """`<root>/cub/CUB_200_2011/` with images/, images.txt, classes.txt, image_class_labels.txt, bounding_boxes.txt.

    Class c's photos are 2*SIZE wide: the left half coded (c, j), the right half white; the bounding box
    is the left half. Class `grey_class`'s photos are grey JPEGs. Image ids run class after class, but
    images.txt lists them shuffled.
    """
    folder = root / "cub" / "CUB_200_2011"
    lines: dict[str, list[str]] = {"images": [], "labels": [], "boxes": []}
    image_id = 0
    for c, name in enumerate(cub_classes()):
        (folder / "images" / name).mkdir(parents=True)
        for j in range(per_class):
            image_id += 1
            photo = np.full((SIZE, 2 * SIZE, 3), 255, np.uint8)
            photo[:, :SIZE] = coded(c, 10 * j)
            picture = Image.fromarray(photo)
            (picture.convert("L") if c == grey_class else picture).save(folder / "images" / name / f"{j}.jpg", quality=100)
            lines["images"].append(f"{image_id} {name}/{j}.jpg")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["boxes"].append(f"{image_id} 0.0 0.0 {SIZE}.0 {SIZE}.0")
    order = np.random.default_rng(0).permutation(image_id)
    (folder / "images.txt").write_text("\n".join(lines["images"][i] for i in order) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (folder / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(cub_classes())))
    return folder
