"""Labelled utterances from files: JSONL, CSV, a folder of `<class>.txt` files, and the intent sets' published class splits.

Every reader returns {class name: [utterance, ...]}, classes sorted by name, utterances in file order (labels stay
strings; an episode maps them to 0..N-1). Bad input is one DataError naming the file (and line) and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from metalight.data.class_lists import PARTS, check_disjoint, read_class_list
from metalight.errors import ConfigError, DataError

# data=<name> -> the folder under <data_dir>/intents (Dopierre et al. 2021, tdopierre/ProtAugment data/)
INTENT_SETS = {"banking77": "BANKING77", "hwu64": "HWU64", "liu": "Liu", "clinc150": "OOS"}
INTENT_SPLITS = (1, 2, 3, 4, 5)
TEXT_SUFFIXES = (".jsonl", ".csv")
_LIST_FILES = {"train": "train", "val": "valid", "test": "test"}  # our part -> their labels.<part>.txt


def decoded(path: Path) -> str:
    """The UTF-8 text of a file (a leading BOM dropped); DataError naming the file and line of bytes that are not UTF-8, or an empty file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}): check the path and its permissions.") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: bytes that are not UTF-8 ({data[exc.start : exc.start + 4]!r}): save the file as UTF-8."
        ) from exc
    if not text.strip():
        raise DataError(f"{path} is empty: give it one utterance a line (with its label).")
    return text


def _grouped(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(text, label) rows as {label: [text, ...]}, labels sorted, texts in row order."""
    classes: dict[str, list[str]] = {}
    for text, label in rows:
        classes.setdefault(label, []).append(text)
    return {label: classes[label] for label in sorted(classes)}


def _row(path: Path, where: int, record: dict, text_column: str, label_column: str, keys: str = "data.source") -> tuple[str, str]:
    """(text, label) of one record, or DataError naming the missing column, the columns found and the key (under `keys`) that names it."""
    for key, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in record:
            found = ", ".join(repr(c) for c in record) or "none"
            raise DataError(
                f"{path}:{where}: no {column!r} column (the columns found: {found}): set {keys}.{key} to the "
                "column that holds it."
            )
    text, label = record[text_column], record[label_column]
    if text is None or not str(text).strip():
        raise DataError(f"{path}:{where}: the {text_column!r} column is empty: give the row its utterance or remove it.")
    if label is None or str(label).strip() == "":
        raise DataError(f"{path}:{where}: the {label_column!r} column is empty: give the row its label or remove it.")
    return str(text).strip(), str(label).strip()


def read_jsonl(path: Path, text_column: str = "text", label_column: str = "label", keys: str = "data.source") -> dict[str, list[str]]:
    """Utterances by label from a JSON Lines file: one object a line with a text and a label field (blank lines skipped); `keys` names the column settings in messages."""
    rows = []
    for number, line in enumerate(decoded(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg}): write one JSON object a line.") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object but {type(record).__name__}: write one JSON object a line.")
        rows.append(_row(path, number, record, text_column, label_column, keys))
    return _grouped(rows)


def read_csv(path: Path, text_column: str = "text", label_column: str = "label", keys: str = "data.source") -> dict[str, list[str]]:
    """Utterances by label from a CSV file with a header row naming the text and label columns; `keys` names the column settings in messages."""
    reader = csv.DictReader(io.StringIO(decoded(path), newline=""))
    columns = reader.fieldnames or []
    for key, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            raise DataError(
                f"{path}: no {column!r} column in the header (the columns found: {found}): set {keys}.{key} to the "
                "column that holds it."
            )
    rows = [_row(path, reader.line_num, record, text_column, label_column, keys) for record in reader]
    if not rows:
        raise DataError(f"{path} has a header but no rows: add one utterance a row.")
    return _grouped(rows)


def read_class_files(folder: Path) -> dict[str, list[str]]:
    """Utterances by class from a folder of `<class>.txt` files, one utterance a line (blank lines skipped)."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.stem not in PARTS]  # train.txt / val.txt / test.txt are class lists, not classes
    if not files:
        raise DataError(f"no <class>.txt files in {folder}: write one file per class, one utterance a line.")
    classes = {}
    for path in files:
        classes[path.stem] = [line.strip() for line in decoded(path).splitlines() if line.strip()]
    return classes


def read_utterances(path: Path, text_column: str = "text", label_column: str = "label") -> dict[str, list[str]]:
    """Utterances by class from a .jsonl or .csv file, or a folder of <class>.txt files; DataError for anything else."""
    if path.is_dir():
        return read_class_files(path)
    if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(
            f"data.root={path} is neither a .jsonl or .csv file nor a folder: point data.root at a JSONL/CSV file with "
            "a text and a label column, or at a folder of <class>.txt files (one utterance a line)."
        )
    read = read_jsonl if path.suffix.lower() == ".jsonl" else read_csv
    return read(path, text_column, label_column)


def intent_folder(root: Path, name: str) -> Path:
    """Where intent set `name` (banking77, hwu64, liu, clinc150) lives under the data root: <root>/intents/<folder>."""
    return Path(root) / "intents" / INTENT_SETS[name]


def intent_split(root: Path, name: str, split: object) -> dict[str, list[str]]:
    """train/val/test intents of published split `split` (1..5) of intent set `name` (Dopierre et al. 2021)."""
    if isinstance(split, bool) or split not in INTENT_SPLITS:
        raise ConfigError(f"data.split={split!r} is not a split of {name}: use one of 1, 2, 3, 4, 5 (Dopierre et al.'s splits).")
    folder = intent_folder(root, name) / "few_shot" / f"{split:02d}"
    parts = {}
    for part, theirs in _LIST_FILES.items():
        path = folder / f"labels.{theirs}.txt"
        if not path.is_file():
            raise DataError(
                f"{path} is missing: place the intent data sets under {Path(root) / 'intents'} (README, Data: Language), "
                "or set paths.data_dir / DATA_DIR to the folder holding intents/."
            )
        parts[part] = [label for _, label in read_class_list(path)]
    check_disjoint(parts, str(folder))
    return parts
