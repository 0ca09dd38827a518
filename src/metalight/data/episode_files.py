"""Fixed few-shot episodes: each a support and a query set of image files with their classes, read from a JSON or CSV file.

JSON: a list of episodes (or {"episodes": [...]}), each {"name": optional, "support": {class: [images]},
"query": {class: [images]}}. CSV: a header `episode,set,class,image` and one row per image, `set` being
support or query. Image paths are relative to the file's folder unless absolute. A class's label is its
position among the episode's support classes, in the order they first appear.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metalight.data.images import ImageRef
from metalight.data.preprocess import ImageFormat
from metalight.errors import ConfigError, DataError

PARTS = ("support", "query")
CSV_COLUMNS = ("episode", "set", "class", "image")


@dataclass(frozen=True)
class Episode:
    """One few-shot task: (image, class name) pairs of its support set and of its query set."""

    name: str
    support: list[tuple[ImageRef, str]]
    query: list[tuple[ImageRef, str]]

    @property
    def classes(self) -> list[str]:
        """Its classes in label order: as they first appear in the support set."""
        return list(dict.fromkeys(name for _, name in self.support))

    def batch(self, image_format: ImageFormat) -> dict[str, Tensor]:
        """The episode as a batch of one task, images read and normalized as the run reads its own."""
        label = {name: c for c, name in enumerate(self.classes)}
        images = image_format([ref for ref, _ in self.support + self.query])
        n = len(self.support)
        support_y = torch.tensor([label[name] for _, name in self.support])
        query_y = torch.tensor([label[name] for _, name in self.query])
        return task_batch(images[:n], support_y, images[n:], query_y)


def task_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
    """One task as the meta-batch of one that EpisodicModule.evaluate_tasks scores (a leading task dimension of 1)."""
    return {"support_x": support_x[None], "support_y": support_y[None], "query_x": query_x[None], "query_y": query_y[None]}


def _checked(path: Path, name: str, support: list[tuple[str, str]], query: list[tuple[str, str]]) -> Episode:
    """An Episode of (image, class) rows, relative images resolved against the file's folder; DataError naming the fault."""
    where = f"episodes file {path}, episode {name!r}"
    if not support or not query:
        raise DataError(f"{where} has no {'support' if not support else 'query'} images: give each episode both sets.")
    known = {cls for _, cls in support}
    for _, cls in query:
        if cls not in known:
            raise DataError(f"{where}: query class {cls!r} has no support images: add some, or remove its queries.")

    def ref(image: str) -> ImageRef:
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise DataError(f"{where} names image {image}, but {file} does not exist: fix the path (relative paths start at the file's folder).")
        return ImageRef(str(file))

    return Episode(name, [(ref(image), cls) for image, cls in support], [(ref(image), cls) for image, cls in query])


def _json_episodes(path: Path) -> list[Episode]:
    """Episodes of a JSON file (module docstring)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"episodes file {path} is not valid JSON ({error}): fix it (format: README, Use a trained learner).") from None
    episodes = data.get("episodes") if isinstance(data, Mapping) else data
    if not isinstance(episodes, list):
        raise DataError(f"episodes file {path} holds no list of episodes: write [{{\"support\": {{class: [images]}}, \"query\": {{...}}}}, ...].")
    read = []
    for number, episode in enumerate(episodes):
        parts = [episode.get(part) if isinstance(episode, Mapping) else None for part in PARTS]
        if not all(isinstance(part, Mapping) and all(isinstance(v, list) for v in part.values()) for part in parts):
            raise DataError(
                f"episodes file {path}, episode {number}: needs \"support\" and \"query\", each {{class: [image paths]}}: fix that entry."
            )
        rows = [[(str(image), str(cls)) for cls, images in part.items() for image in images] for part in parts]
        read.append(_checked(path, str(episode.get("name", number)), *rows))
    return read


def _csv_episodes(path: Path) -> list[Episode]:
    """Episodes of a CSV file (module docstring), in the order they first appear."""
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise DataError(f"episodes file {path} has columns {reader.fieldnames}: its header must be {','.join(CSV_COLUMNS)}.")
        rows: dict[str, dict[str, list[tuple[str, str]]]] = {}
        for line, row in enumerate(reader, start=2):
            if row["set"] not in PARTS or not row["image"] or not row["class"] or None in row.values():
                raise DataError(f"{path}:{line}: expected episode,support|query,class,image; got {list(row.values())}: fix the row.")
            rows.setdefault(row["episode"], {part: [] for part in PARTS})[row["set"]].append((row["image"], row["class"]))
    return [_checked(path, name, parts["support"], parts["query"]) for name, parts in rows.items()]


def read_episodes(path: str | Path) -> list[Episode]:
    """The episodes listed in a .json or .csv file; DataError naming the file (and entry) when it cannot be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"episodes={path}: no such file. Give a .json or .csv episodes file, or episodes=lake_runs.")
    readers = {".json": _json_episodes, ".csv": _csv_episodes}
    if path.suffix.lower() not in readers:
        raise ConfigError(f"episodes={path}: not a .json or .csv file; write the episodes in one of those (README, Use a trained learner).")
    episodes = readers[path.suffix.lower()](path)
    if not episodes:
        raise DataError(f"episodes file {path} lists no episodes: add at least one.")
    return episodes
