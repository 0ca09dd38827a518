"""`predict.py`: a trained run adapted to a support folder (one subfolder per class) classifies query images into a CSV."""

from __future__ import annotations

import csv
import glob
import io
import logging
from pathlib import Path

from omegaconf import DictConfig

from metalight.runs.checkpoint_io import write_text_atomically
from metalight.data.images import IMAGE_SUFFIXES
from metalight.errors import ConfigError, DataError
from metalight.apply.learner import FewShotLearner

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


def predictions_csv(queries: list[Path], classes: list[str], probabilities: list[list[float]]) -> str:
    """One row per query: its path, the predicted class, and the probability of every class (columns prob_<class>)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "predicted", *(f"prob_{c}" for c in classes)])
    for path, row in zip(queries, probabilities):
        writer.writerow([str(path), classes[max(range(len(row)), key=row.__getitem__)], *(f"{p:.6f}" for p in row)])
    return text.getvalue()


def predict(cfg: DictConfig) -> Path:
    """Adapt cfg.ckpt_path's learner to cfg.support, classify cfg.query, print a table and write cfg.output; its path."""
    learner = FewShotLearner.load(cfg.ckpt_path, cfg.device, runs_dir=Path(cfg.paths.log_dir) / "train" / "runs")
    if learner.regresses:
        raise ConfigError(
            f"predict.py classifies images, but {learner.checkpoint} learned regression tasks: in Python, "
            "FewShotLearner.load(<run>).adapt(x, y).predict(x_new) takes tensors (README, Regression)."
        )
    images, labels = support_set(Path(cfg.support).expanduser())
    queries = query_images(str(cfg.query))
    probabilities = learner.adapt(images, labels).predict(queries).tolist()
    classes = [str(c) for c in learner.classes]
    width = max(len(str(q)) for q in queries)
    print(f"{'query':<{width}}  {'predicted':<20} probability")
    for path, row in zip(queries, probabilities):
        best = max(range(len(row)), key=row.__getitem__)
        print(f"{str(path):<{width}}  {classes[best]:<20} {row[best]:.3f}")
    output = Path(cfg.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, predictions_csv(queries, classes, probabilities))
    log.info("%d queries, %d classes (%s learner, %s); predictions saved to %s", len(queries), len(classes), learner.name, learner.checkpoint, output)
    return output
