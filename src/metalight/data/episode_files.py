"""Fixed few-shot episodes: each a support and a query set of image files (or utterances) with their classes, read from a JSON or CSV file.

JSON: a list of episodes (or {"episodes": [...]}), each {"name": optional, "support": {class: [images]},
"query": {class: [images]}}. CSV: a header `episode,set,class,image` and one row per image, `set` being
support or query. Image paths are relative to the file's folder unless absolute. A class's label is its
position among the episode's support classes, in the order they first appear.

For a text run the items are the utterances themselves: {"support": {class: [utterances]}, ...} in JSON, and a
header `episode,set,class,text` in CSV (quote an utterance holding a comma, as CSV does).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import torch.nn.functional as F

from metalight.data.images import ImageRef
from metalight.data.preprocess import InputFormat
from metalight.errors import ConfigError, DataError
from metalight.text.pretrained import PAD_ID

PARTS = ("support", "query")
ITEM_COLUMN = {"images": "image", "text": "text"}  # the CSV column of an episode's items, per data modality
CSV_COLUMNS = ("episode", "set", "class", ITEM_COLUMN["images"])
Item = ImageRef | str  # an image file, or an utterance (text runs)


@dataclass(frozen=True)
class Episode:
    """One few-shot task: (image or utterance, class name) pairs of its support set and of its query set."""

    name: str
    support: list[tuple[Item, str]]
    query: list[tuple[Item, str]]

    @property
    def classes(self) -> list[str]:
        """Its classes in label order: as they first appear in the support set."""
        return list(dict.fromkeys(name for _, name in self.support))

    def batch(self, input_format: InputFormat) -> dict[str, Tensor]:
        """The episode as a batch of one task, its images read and normalized (utterances tokenized) as the run reads its own."""
        label = {name: c for c, name in enumerate(self.classes)}
        images = input_format([item for item, _ in self.support + self.query])
        n = len(self.support)
        support_y = torch.tensor([label[name] for _, name in self.support])
        query_y = torch.tensor([label[name] for _, name in self.query])
        return task_batch(images[:n], support_y, images[n:], query_y)


def task_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
    """One task as the meta-batch of one that EpisodicModule.evaluate_tasks scores (a leading task dimension of 1).

    Token ids [n, L] of two lengths are padded (PAD_ID, masked by every text model) to the longer, as a text batch has one L.
    """
    if not support_x.is_floating_point() and support_x.shape[-1] != query_x.shape[-1]:
        length = max(support_x.shape[-1], query_x.shape[-1])
        support_x, query_x = (F.pad(x, (0, length - x.shape[-1]), value=PAD_ID) for x in (support_x, query_x))
    return {"support_x": support_x[None], "support_y": support_y[None], "query_x": query_x[None], "query_y": query_y[None]}


def _checked(path: Path, name: str, support: list[tuple[str, str]], query: list[tuple[str, str]], modality: str) -> Episode:
    """An Episode of (item, class) rows, relative images resolved against the file's folder (utterances kept); DataError naming the fault."""
    where = f"episodes file {path}, episode {name!r}"
    items = "utterances" if modality == "text" else "images"
    if not support or not query:
        raise DataError(f"{where} has no {'support' if not support else 'query'} {items}: give each episode both sets.")
    known = {cls for _, cls in support}
    for _, cls in query:
        if cls not in known:
            raise DataError(f"{where}: query class {cls!r} has no support {items}: add some, or remove its queries.")
    if modality == "text":
        empty = next((cls for text, cls in support + query if not text.strip()), None)
        if empty is not None:
            raise DataError(f"{where}: an utterance of class {empty!r} is empty: give it some text, or remove it.")
        return Episode(name, list(support), list(query))

    def ref(image: str) -> ImageRef:
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise DataError(f"{where} names image {image}, but {file} does not exist: fix the path (relative paths start at the file's folder).")
        return ImageRef(str(file))

    return Episode(name, [(ref(image), cls) for image, cls in support], [(ref(image), cls) for image, cls in query])


def _json_episodes(path: Path, modality: str) -> list[Episode]:
    """Episodes of a JSON file (module docstring)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"episodes file {path} is not valid JSON ({error}): fix it (format: README, Use a trained learner).") from None
    episodes = data.get("episodes") if isinstance(data, Mapping) else data
    if not isinstance(episodes, list):
        raise DataError(f"episodes file {path} holds no list of episodes: write [{{\"support\": {{class: [{_items(modality)}]}}, \"query\": {{...}}}}, ...].")
    read = []
    for number, episode in enumerate(episodes):
        parts = [episode.get(part) if isinstance(episode, Mapping) else None for part in PARTS]
        if not all(isinstance(part, Mapping) and all(isinstance(v, list) for v in part.values()) for part in parts):
            raise DataError(
                f"episodes file {path}, episode {number}: needs \"support\" and \"query\", each {{class: [{_items(modality)}]}}: fix that entry."
            )
        rows = [[(str(image), str(cls)) for cls, images in part.items() for image in images] for part in parts]
        read.append(_checked(path, str(episode.get("name", number)), *rows, modality))
    return read


def _items(modality: str) -> str:
    """What an episode's class lists hold, for messages."""
    return "utterances" if modality == "text" else "image paths"


def _csv_episodes(path: Path, modality: str) -> list[Episode]:
    """Episodes of a CSV file (module docstring), in the order they first appear."""
    columns = (*CSV_COLUMNS[:3], ITEM_COLUMN[modality])
    item = columns[-1]
    with path.open(newline="", encoding="utf-8") as file:
        try:
            reader = csv.DictReader(file)
            if tuple(reader.fieldnames or ()) != columns:
                raise DataError(f"episodes file {path} has columns {reader.fieldnames}: its header must be {','.join(columns)}.")
            rows: dict[str, dict[str, list[tuple[str, str]]]] = {}
            for line, row in enumerate(reader, start=2):
                if row["set"] not in PARTS or not row[item] or not row["class"] or None in row.values():
                    raise DataError(f"{path}:{line}: expected {','.join(columns).replace(',set,', ',support|query,')}; got {list(row.values())}: fix the row.")
                rows.setdefault(row["episode"], {part: [] for part in PARTS})[row["set"]].append((row[item], row["class"]))
        except UnicodeDecodeError as error:
            raise DataError(f"episodes file {path} is not UTF-8 ({error.reason} at byte {error.start}): save it as UTF-8.") from None
    return [_checked(path, name, parts["support"], parts["query"], modality) for name, parts in rows.items()]


def read_episodes(path: str | Path, modality: str = "images") -> list[Episode]:
    """The episodes listed in a .json or .csv file, of images or (modality="text") utterances; DataError naming the file (and entry) when it cannot be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"episodes={path}: no such file. Give a .json or .csv episodes file, or episodes=lake_runs.")
    readers = {".json": _json_episodes, ".csv": _csv_episodes}
    if path.suffix.lower() not in readers:
        raise ConfigError(f"episodes={path}: not a .json or .csv file; write the episodes in one of those (README, Use a trained learner).")
    episodes = readers[path.suffix.lower()](path, modality)
    if not episodes:
        raise DataError(f"episodes file {path} lists no episodes: add at least one.")
    return episodes
