"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 photos, with the 100/50/50 class split of Chen et al. (2019).

Layout: the official archive CUB_200_2011.tgz unpacked, i.e. `CUB_200_2011/` holding `images/<class>/<file>.jpg`,
`images.txt` (`<image id> <class>/<file>.jpg`), `classes.txt` (`<class id> <class>`),
`image_class_labels.txt` (`<image id> <class id>`) and, for data.source.crop=true, `bounding_boxes.txt`
(`<image id> <x> <y> <width> <height>`). It is looked for at `<root>/cub/CUB_200_2011`, `<root>/cub` and
`<root>/CUB_200_2011`.

Classes are the names of classes.txt (`001.Black_footed_Albatross`, ...), 41 to 60 images each, ordered
by image id; the split picks them by the shipped lists (splits/cub/). Images are RGB (the few grey ones
converted), optionally cropped to their bounding box, then resized to image_size x image_size (84 in the
papers). All 200 classes share one cache.
"""

from __future__ import annotations

from pathlib import Path

from metalight.data.cache import cache_name, cached_grouped
from metalight.data.class_lists import PARTS, packaged, packaged_path
from metalight.data.images import ImageRef, SplitImages, decode_images, file_identity, files_digest
from metalight.errors import DataError

SPLITS = ("chen",)
OPTIONS = ("crop",)
LOCATIONS = ("cub/CUB_200_2011", "cub", "CUB_200_2011")


def cub_folder(root: Path) -> Path:
    """The folder holding images.txt: the first of LOCATIONS under root that has it."""
    for location in LOCATIONS:
        if (root / location / "images.txt").is_file():
            return root / location
    tried = ", ".join(str(root / location) for location in LOCATIONS)
    raise DataError(
        f"CUB-200-2011 not found: no images.txt in {tried}. Download CUB_200_2011.tgz (Caltech, "
        "www.vision.caltech.edu/datasets/cub_200_2011/), unpack it into <data_dir>/cub/, or point DATA_DIR "
        "(paths.data_dir) at the folder holding cub/."
    )


def read_table(path: Path, columns: int) -> dict[str, list[str]]:
    """`<id> <value> ...` lines of a CUB metadata file: id -> its `columns` values; DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"{path} not found: it is part of CUB_200_2011.tgz; restore it from the archive.")
    table: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns + 1 or fields[0] in table:
            raise DataError(
                f"{path}:{number}: {line!r} is not `<id>` and {columns} value(s), or repeats an id: restore the "
                "file from CUB_200_2011.tgz."
            )
        table[fields[0]] = fields[1:]
    return table


def list_images(folder: Path, crop: bool) -> tuple[dict[str, list[ImageRef]], dict[str, list[tuple[float, ...]]], list]:
    """Class name -> its images (by image id), their bounding boxes (when cropping), and the source identity."""
    paths, labels = read_table(folder / "images.txt", 1), read_table(folder / "image_class_labels.txt", 1)
    names = {cid: value[0] for cid, value in read_table(folder / "classes.txt", 1).items()}
    boxes = read_table(folder / "bounding_boxes.txt", 4) if crop else {}
    classes: dict[str, list[ImageRef]] = {}
    class_boxes: dict[str, list[tuple[float, ...]]] = {}
    for image_id in sorted(paths, key=int):
        if image_id not in labels or labels[image_id][0] not in names:
            raise DataError(
                f"image {image_id} of {folder / 'images.txt'} has no class in image_class_labels.txt / classes.txt: "
                "restore the files from CUB_200_2011.tgz."
            )
        name = names[labels[image_id][0]]
        classes.setdefault(name, []).append(ImageRef(str(folder / "images" / paths[image_id][0])))
        if crop:
            if image_id not in boxes:
                raise DataError(f"image {image_id} has no line in {folder / 'bounding_boxes.txt'}: restore the file.")
            class_boxes.setdefault(name, []).append(tuple(float(v) for v in boxes[image_id]))
    metadata = ["images.txt", "image_class_labels.txt", "classes.txt"] + (["bounding_boxes.txt"] if crop else [])
    try:
        digest = files_digest(Path(ref.name) for refs in classes.values() for ref in refs)
    except FileNotFoundError as exc:
        raise DataError(f"image {exc.filename} listed in {folder / 'images.txt'} not found: restore it.") from exc
    return classes, class_boxes, [*(file_identity(folder / m) for m in metadata), digest]


def load_cub(
    root: Path, split: str, image_size: int, cache_dir: Path, download: bool = False, crop: bool = False
) -> dict[str, SplitImages]:
    """Train/val/test SplitImages of CUB-200-2011 with Chen et al.'s split, decoded into `cache_dir` on first use."""
    folder = cub_folder(root)
    classes, boxes, identity = list_images(folder, bool(crop))
    parts = {part: packaged("cub", part) for part in PARTS}
    for part, wanted in parts.items():
        missing = [name for name in wanted if name not in classes]
        if missing:
            raise DataError(
                f"class {missing[0]!r} of the shipped CUB {part} list ({packaged_path('cub', part)}) is not in "
                f"{folder / 'classes.txt'}: this is not CUB-200-2011's class list; restore it from the archive."
            )
    names = sorted(classes)
    refs = [ref for name in names for ref in classes[name]]
    crops = [box for name in names for box in boxes[name]] if crop else None
    key = {"dataset": "cub", "image_size": image_size, "crop": bool(crop), "source": identity}
    base = cached_grouped(
        cache_dir, cache_name("cub", "cropped" if crop else "full", image_size, root), key, names,
        [len(classes[n]) for n in names], (3, image_size, image_size),
        lambda out: decode_images(refs, out, "RGB", desc="caching CUB-200-2011", boxes=crops),  # type: ignore[arg-type]
    )
    return {part: base.subset(wanted) for part, wanted in parts.items()}
