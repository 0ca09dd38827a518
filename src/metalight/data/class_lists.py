"""Class lists: the published splits shipped in `splits/` beside this file (provenance in splits/README.md) and users' list files."""

from __future__ import annotations

import csv
from pathlib import Path

from metalight.errors import DataError

SPLITS_DIR = Path(__file__).with_name("splits")
PARTS = ("train", "val", "test")


def read_class_list(path: Path) -> list[tuple[int, str]]:
    """(line number, class name) of each line of a class-list file: one class per line, blank lines and `#` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the class list {path} ({exc}): make it a readable UTF-8 text file.") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if name:
            rows.append((number, name))
    return rows


def packaged_path(name: str, part: str) -> Path:
    """Where part (train/val/test) of the shipped split `name` lives: splits/<name>/<part>.txt or .csv."""
    for suffix in (".txt", ".csv"):
        path = SPLITS_DIR / name / f"{part}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no shipped split {name}/{part} under {SPLITS_DIR}: the installation is incomplete")


def packaged(name: str, part: str) -> list[str]:
    """Class names of part (train/val/test) of a published split shipped with metalight (the first column of a .csv)."""
    path = packaged_path(name, part)
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [row[0] for row in csv.reader(f) if row]
    return [name for _, name in read_class_list(path)]


def check_disjoint(parts: dict[str, list[str]], where: str) -> None:
    """DataError naming the first class that two parts (train/val/test) share, and where the lists came from."""
    seen: dict[str, str] = {}
    for part, names in parts.items():
        for name in names:
            if seen.setdefault(name, part) != part:
                raise DataError(
                    f"class {name!r} is in both the {seen[name]} and the {part} list of {where}: a class may "
                    "belong to one split only; remove it from one of them."
                )
