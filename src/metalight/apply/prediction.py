"""`predict.py`: a trained run adapted to a support set classifies queries into a CSV.

An image run's support set is a folder (one subfolder of images per class), its queries image files; a text run's
support set is a CSV (or JSONL) file of utterances and their labels (columns.text_column / columns.label_column), its
queries a text file (one utterance a line) or a CSV's text column.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from metalight.runs.checkpoint_io import write_text_atomically
from metalight.data.images import IMAGE_SUFFIXES
from metalight.errors import ConfigError, DataError
from metalight.apply.learner import FewShotLearner
from metalight.text import readers

log = logging.getLogger(__name__)
SUFFIXES = "/".join(IMAGE_SUFFIXES)


def _image_files(paths: list[Path]) -> list[Path]:
    """The files among `paths` (hidden ones skipped), sorted; DataError naming the first that is not an image file."""
    files = sorted(p for p in paths if p.is_file() and not p.name.startswith("."))
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path} is not an image ({SUFFIXES}): remove it, or convert it to one of those.")
    return files


def support_set(folder: Path) -> tuple[list[Path], list[str]]:
    """The images of each class subfolder of `folder` and their class (the subfolder's name), classes sorted by name."""
    if not folder.is_dir():
        raise DataError(f"support={folder} is not a folder: give a folder holding one subfolder of images per class.")
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"support={folder} holds no class subfolders: put each class's images in a subfolder named after it.")
    images, labels = [], []
    for directory in classes:
        files = _image_files(list(directory.iterdir()))
        if not files:
            raise DataError(f"class folder {directory} holds no images ({SUFFIXES}): add some, or remove the folder.")
        images += files
        labels += [directory.name] * len(files)
    return images, labels


def query_images(query: str) -> list[Path]:
    """The images `query` names: a folder (recursively), one file, or a glob pattern; DataError when there are none."""
    path = Path(query).expanduser()
    if path.is_dir():
        files = _image_files(list(path.rglob("*")))
    elif path.is_file():
        files = _image_files([path])
    else:
        files = _image_files([Path(p) for p in sorted(glob.glob(str(path), recursive=True))])
    if not files:
        raise DataError(f"query={query} names no images ({SUFFIXES}): give a folder of images, an image file, or a glob pattern that matches some.")
    return files


def support_utterances(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The utterances of a support .csv / .jsonl file and their labels, classes sorted by name; DataError naming the file and the fix."""
    if not path.is_file() or path.suffix.lower() not in readers.TEXT_SUFFIXES:
        raise DataError(f"support={path} is not a .csv or .jsonl file: give a file with a {text_column!r} and a {label_column!r} column (columns.*).")
    read = readers.read_jsonl if path.suffix.lower() == ".jsonl" else readers.read_csv
    classes = read(path, text_column, label_column, keys="columns")
    return [text for texts in classes.values() for text in texts], [label for label, texts in classes.items() for _ in texts]


def query_utterances(query: str, text_column: str) -> list[str]:
    """The utterances of a query file: a .csv's text column, else one utterance a line (blank lines skipped); DataError when there are none."""
    path = Path(query).expanduser()
    if not path.is_file():
        raise DataError(f"query={query} is not a file: give a text file (one utterance a line) or a CSV with a {text_column!r} column.")
    if not path.read_bytes().strip():
        raise DataError(f"query={path} is empty: write one utterance a line (or a CSV with a {text_column!r} column).")
    content = readers.decoded(path)  # DataError naming the line of bytes that are not UTF-8
    if path.suffix.lower() != ".csv":
        return [line.strip() for line in content.splitlines() if line.strip()]
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if text_column not in (reader.fieldnames or []):
        found = ", ".join(repr(c) for c in reader.fieldnames or []) or "none"
        raise DataError(f"{path}: no {text_column!r} column in the header (the columns found: {found}): set columns.text_column to the column that holds it.")
    texts = [str(row[text_column] or "").strip() for row in reader]
    empty = next((line for line, text in enumerate(texts, start=2) if not text), None)
    if empty is not None:
        raise DataError(f"{path}:{empty}: the {text_column!r} column is empty: give the row its utterance or remove it.")
    if not texts:
        raise DataError(f"{path} has a header but no rows: add one utterance a row.")
    return texts


def predictions_csv(queries: Sequence[Path | str], classes: list[str], probabilities: list[list[float]], first: str = "path") -> str:
    """One row per query: its path (or utterance: first="text"), the predicted class, and the probability of every class (columns prob_<class>)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([first, "predicted", *(f"prob_{c}" for c in classes)])
    for path, row in zip(queries, probabilities):
        writer.writerow([str(path), classes[max(range(len(row)), key=row.__getitem__)], *(f"{p:.6f}" for p in row)])
    return text.getvalue()


def predict(cfg: DictConfig) -> Path:
    """Adapt cfg.ckpt_path's learner to cfg.support, classify cfg.query, print a table and write cfg.output; its path."""
    learner = FewShotLearner.load(cfg.ckpt_path, cfg.device, runs_dir=Path(cfg.paths.log_dir) / "train" / "runs")
    if learner.regresses:
        raise ConfigError(
            f"predict.py classifies images or texts, but {learner.checkpoint} learned regression tasks: in Python, "
            "FewShotLearner.load(<run>).adapt(x, y).predict(x_new) takes tensors (README, Regression)."
        )
    text = learner.modality == "text"
    if text:
        inputs, labels = support_utterances(Path(cfg.support).expanduser(), cfg.columns.text_column, cfg.columns.label_column)
        queries: list = query_utterances(str(cfg.query), cfg.columns.text_column)
    else:
        inputs, labels = support_set(Path(cfg.support).expanduser())
        queries = query_images(str(cfg.query))
    probabilities = learner.adapt(inputs, labels).predict(queries).tolist()
    classes = [str(c) for c in learner.classes]
    width = min(max(len(str(q)) for q in queries), 60)
    print(f"{'query':<{width}}  {'predicted':<20} probability")
    for path, row in zip(queries, probabilities):
        best = max(range(len(row)), key=row.__getitem__)
        shown = str(path)
        if len(shown) > width:  # an utterance keeps its start, a path its end (the file name)
            shown = shown[: width - 3] + "..." if text else "..." + shown[3 - width :]
        print(f"{shown:<{width}}  {classes[best]:<20} {row[best]:.3f}")
    output = Path(cfg.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, predictions_csv(queries, classes, probabilities, "text" if text else "path"))
    log.info("%d queries, %d classes (%s learner, %s); predictions saved to %s", len(queries), len(classes), learner.name, learner.checkpoint, output)
    return output
