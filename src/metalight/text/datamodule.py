"""TextDataModule: few-shot text classification tasks (intent detection, your own labelled utterances) as token-id episodes.

Batches are dicts like the images' (data/datamodule.py): support_x [B, N*K, L] and query_x [B, N*Q, L] token ids,
support_y / query_y labels; flat batches (algo=baseline) {"x": [b, L], "y": [b]}. Ids are int32 on the host and
int64 on the device, padded with PAD_ID (0) at the end of each row, L cut to the longest utterance of the batch.
Tasks are drawn exactly as image tasks (EpisodeDataset, the same samplers): training tasks deterministic in
(seed, step, rank), validation and test tasks fixed by eval_seed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from metalight.data.cache import cache_name
from metalight.data.class_tasks import PARTS, ClassTaskDataModule
from metalight.data.folder import SPLITS as TEXT_SPLITS
from metalight.data.folder import choose_split
from metalight.data.images import SplitImages
from metalight.errors import ConfigError, DataError
from metalight.tasks.datamodule import check_whole_number, plain_dict
from metalight.text import readers
from metalight.text.pretrained import PAD_ID
from metalight.text.tokens import TextTokenizer, TokenizedSet, content_identity, tokenized

log = logging.getLogger(__name__)

TEXT_OPTIONS = ("text_column", "label_column", "lists", "ratios", "split_seed")
_TEXT_LABELS = ("label", "values of the label column (or <class>.txt file names)")  # class naming in class-list messages
_INTENT_COLUMNS = {"text_column": "sentence", "label_column": "label"}  # tdopierre/ProtAugment's full.jsonl


class TextDataModule(ClassTaskDataModule):
    """Few-shot tasks of tokenized utterances: data=banking77 | hwu64 | liu | clinc150 (published splits) or data=text (yours).

    dataset: an intent set (INTENT_SETS, read from <root>/intents/<set>/, split = 1..5: Dopierre et al.'s class
    splits) or "text" (root: a .jsonl / .csv file or a folder of <class>.txt files; split auto | lists | ratios as
    data=folder, with data.source). max_tokens cuts longer utterances (logged once, with how many); tokenizer: a
    tokenizers JSON, null = WordLlama's. Intent sets only: test_source = another intent set whose test intents of the
    same split number are the test tasks; train_sources = intent sets whose training intents, joined and named
    "<set>/<intent>", are the training classes (validation stays the data set's own).
    """

    modality = "text"  # what the data feeds the model (a text model refuses image data, and an image model text)
    items = "utterances"

    def __init__(
        self,
        dataset: str,
        root: str | None,
        split: object,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 5,
        n_way_train: int | None = None,
        k_shot_train: int | None = None,
        k_query_train: int | None = None,
        meta_batch_size: int = 4,
        eval_batch_size: int = 16,
        batches_per_epoch: int = 500,
        n_val_tasks: int = 200,
        n_test_tasks: int = 600,
        seed: int = 0,
        eval_seed: int = 0,
        max_tokens: int = 64,
        tokenizer: str | None = None,
        source: Mapping | None = None,
        test_source: str | None = None,
        train_sources: Sequence[str] | None = None,
        small_classes: str = "error",
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str = ".cache",
        train_mode: str = "episodes",
        batch_size: int | None = None,
        train_on_val: bool = False,
    ) -> None:
        intent = dataset in readers.INTENT_SETS
        if not intent and dataset != "text":
            raise ConfigError(f"data.dataset={dataset!r} is not known: use text or one of {', '.join(readers.INTENT_SETS)}.")
        if root is None:
            where = "a .jsonl or .csv file, or a folder of <class>.txt files" if dataset == "text" else "the folder holding intents/"
            raise ConfigError(f"data.root is not set: set data.root=<{where}> (README, Data: Language).")
        if intent and (isinstance(split, bool) or split not in readers.INTENT_SPLITS):
            raise ConfigError(f"data.split={split!r} is not a split of {dataset}: use one of 1, 2, 3, 4, 5 (Dopierre et al.'s splits).")
        if not intent and split not in TEXT_SPLITS:
            raise ConfigError(f"data.split={split!r} is not valid for data=text: use one of {', '.join(TEXT_SPLITS)}.")
        check_whole_number("max_tokens", max_tokens, 1)
        source = plain_dict(source)
        options = TEXT_OPTIONS if not intent else ()
        unknown = sorted(set(source) - set(options))
        if unknown:
            raise ConfigError(f"data.source.{unknown[0]} is not an option of {dataset} (its options: {', '.join(options) or 'none'}): remove it.")
        train_sources = list(train_sources) if train_sources is not None else None
        for key, names in (("test_source", [test_source] if test_source is not None else []), ("train_sources", train_sources or [])):
            if names and not intent:
                raise ConfigError(f"data.{key} takes intent sets, for intent data (data=banking77 ...), not data=text: remove it.")
            bad = [n for n in names if n not in readers.INTENT_SETS]
            if bad:
                raise ConfigError(f"data.{key}: {bad[0]!r} is not an intent set: use {', '.join(readers.INTENT_SETS)}.")
        if train_sources is not None and not train_sources:
            raise ConfigError("data.train_sources=[] names no intent set: list some, e.g. [clinc150,hwu64,liu], or set it to null.")
        super().__init__(
            dataset, split, n_way, k_shot, k_query, n_way_train, k_shot_train, k_query_train, meta_batch_size,
            eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed, small_classes, num_workers,
            pin_memory, persistent_workers, train_mode, batch_size, train_on_val,
        )
        self.root, self.source, self.cache_dir = Path(root), source, Path(cache_dir)
        self.test_source, self.train_sources = test_source, train_sources
        self.tokens = TextTokenizer(tokenizer, max_tokens)
        self.max_tokens, self.tokenizer = max_tokens, tokenizer
        self._names: dict[str, list[str]] = {}
        self._splits: dict[str, SplitImages] = {}

    # ----- reading and tokenizing
    def _intent_set(self, name: str) -> TokenizedSet:
        """All utterances of intent set `name` (its full.jsonl), tokenized (cached)."""
        path = readers.intent_folder(self.root, name) / "full.jsonl"
        if not path.is_file():
            raise DataError(
                f"{path} is missing: place the intent data sets under {self.root / 'intents'} (README, Data: Language), or "
                "set paths.data_dir / DATA_DIR to the folder holding intents/."
            )
        return self._tokenized(name, path, lambda: readers.read_jsonl(path, **_INTENT_COLUMNS), _INTENT_COLUMNS)

    def _tokenized(self, name: str, path: Path, read, options: dict) -> TokenizedSet:
        """Source `path` tokenized into the cache (built by read() on a miss)."""
        stem = cache_name(f"text-{name}", "tokens", self.max_tokens, path, unit="tok")
        return tokenized(self.cache_dir, stem, content_identity(path), read, self.tokens, options)

    def _intent_part(self, name: str, part: str, data: TokenizedSet, prefix: bool = False) -> SplitImages:
        """Part (train/val/test) of published split data.split of intent set `name`: its listed intents, checked present."""
        listed = readers.intent_split(self.root, name, self.split)[part]
        missing = [label for label in listed if label not in set(data.split.classes)]
        if missing:
            raise DataError(
                f"{readers.intent_folder(self.root, name)}/few_shot/{self.split:02d} lists the intent {missing[0]!r}, which "
                f"{data.source} does not hold: restore the data set's full.jsonl (README, Data: Language)."
            )
        chosen = data.split.subset(listed)
        return dataclasses.replace(chosen, classes=[f"{name}/{c}" for c in chosen.classes]) if prefix else chosen

    def _load_intents(self) -> tuple[dict[str, SplitImages], list[TokenizedSet]]:
        """The three parts of data.split, with data.test_source's test intents and data.train_sources' training intents."""
        sets = {name: self._intent_set(name) for name in {self.dataset, self.test_source, *(self.train_sources or [])} - {None}}
        parts = {part: self._intent_part(self.dataset, part, sets[self.dataset]) for part in PARTS}
        if self.test_source is not None:
            parts["test"] = self._intent_part(self.test_source, "test", sets[self.test_source])
        if self.train_sources is not None:
            joined = [self._intent_part(name, "train", sets[name], prefix=True) for name in self.train_sources]
            parts["train"] = joined[0]
            for more in joined[1:]:
                parts["train"] = parts["train"].joined(more)
        how = f"split {self.split}" + (f", test intents of {self.test_source}" if self.test_source else "")
        how += f", training intents of {'+'.join(self.train_sources)}" if self.train_sources else ""
        log.info("data=%s (%s): %d/%d/%d intents (train/val/test).", self.dataset, how, *(len(parts[p].classes) for p in PARTS))
        return parts, list(sets.values())

    def _load_text(self) -> tuple[dict[str, SplitImages], list[TokenizedSet]]:
        """Your own utterances (data=text), tokenized, split by class lists or ratios as data=folder."""
        columns = {k: self.source.get(k, "text" if k == "text_column" else "label") for k in ("text_column", "label_column")}
        read = lambda: readers.read_utterances(self.root, **columns)  # noqa: E731
        data = self._tokenized("text", self.root, read, columns if not self.root.is_dir() else {})
        classes = {name: range(count) for name, count in zip(data.split.classes, data.split.counts.tolist())}
        parts, how = choose_split(
            self.root, classes, self.split, self.source.get("lists"), self.source.get("ratios"), self.source.get("split_seed"),
            _TEXT_LABELS,
        )
        log.info(
            "data=text: %d classes in %s, split %s into %d/%d/%d classes (train/val/test).",
            len(classes), self.root, how, *(len(parts[p]) for p in PARTS),
        )
        return {part: data.split.subset(parts[part]) for part in PARTS}, [data]

    def setup(self, stage: str | None = None) -> None:
        """Tokenize (or load the caches), split, check the task shapes fit, and say once how many utterances were cut."""
        if self._datasets:
            return
        loaded, sources = self._load_intents() if self.dataset in readers.INTENT_SETS else self._load_text()
        for data in sources:
            if data.cut and rank_zero_only.rank == 0:
                log.warning(
                    "data.max_tokens=%d cut %d of the %d utterances of %s (the longest has %d tokens): raise data.max_tokens "
                    "to keep them whole.", self.max_tokens, data.cut, data.utterances, data.source, data.longest,
                )
        splits = self._checked_splits(loaded)
        self._names = {part: list(splits[part].classes) for part in PARTS}
        self._splits = splits
        self._datasets = self._task_datasets(splits)

    # ----- what the learners and the predict API use
    def label_names(self, split: str) -> list[str]:
        """Class names of a split (train/val/test) after setup(), in class order: task class c of an episode is one of these."""
        if not self._names:
            raise RuntimeError("call setup() before label_names()")
        return list(self._names[split])

    def input_format(self) -> TextFormat:
        """How this data's utterances reach the model (tokenizer, max_tokens): what a trained learner applies to new text."""
        return TextFormat(self.tokenizer, self.max_tokens)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """New utterances as the data's token ids: LongTensor [n, L], cut at data.max_tokens, L the longest of them."""
        return self.input_format()(texts)

    def task_class_names(self, part: str, index: int) -> list[str]:
        """The class names of fixed task `index` of the val or test split (task label c is the c-th), after setup()."""
        classes, _ = self._datasets[part].choose(0, index)  # fixed tasks are keys (0, index): tasks/samplers.EvalTaskSampler
        names = self.label_names(part)
        return [names[c] for c in classes]

    def utterances(self, part: str, per_class: int) -> tuple[torch.Tensor, list[int]]:
        """Token ids [n, L] of the first `per_class` utterances of every class of a split (after setup()) and each one's class number."""
        data = self._splits[part]
        rows = [row for c in range(len(data.classes)) for row in range(int(data.starts[c]), int(data.starts[c]) + min(per_class, int(data.counts[c])))]
        labels = [c for c in range(len(data.classes)) for _ in range(min(per_class, int(data.counts[c])))]
        return trimmed(torch.from_numpy(data.images[rows]).long()), labels

    def state_dict(self) -> dict:
        """Saved in every checkpoint: how the run tokenized (a learner applied later must tokenize the same way)."""
        return {"tokenizer": self.tokenizer, "max_tokens": self.max_tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        """Refuse a checkpoint tokenized with another tokenizer (its token ids would mean other tokens)."""
        if state_dict and state_dict.get("tokenizer") != self.tokenizer:
            raise ConfigError(
                f"the checkpoint was trained with data.tokenizer={state_dict.get('tokenizer')} but this run has "
                f"data.tokenizer={self.tokenizer}: set data.tokenizer={state_dict.get('tokenizer')}."
            )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Token ids of a batch, already on the device, as int64 cut to the batch's longest utterance (one L for support and query)."""
        keys = [key for key in ("support_x", "query_x", "x") if key in batch and not batch[key].is_floating_point()]
        if keys:
            length = max(int(_used_length(batch[key])) for key in keys)
            for key in keys:
                batch[key] = batch[key][..., : max(length, 1)].long()
        return batch


@dataclass(frozen=True)
class TextFormat:
    """A run's text settings (data.tokenizer, null: WordLlama's; data.max_tokens): utterances -> the token ids its model reads.

    The data module tokenizes its own utterances with the same TextTokenizer into its cache, so a string gives the
    same ids both ways (up to the padding columns, which every text model masks out).
    """

    tokenizer: str | None
    max_tokens: int

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor [n, L] of `texts` (stripped, cut at max_tokens), L the longest of them; DataError for an empty one."""
        if isinstance(texts, str):
            raise ConfigError(f"got one string ({texts[:40]!r}), not a list of utterances: give a list, e.g. [{texts[:20]!r}].")
        empty = [i for i, text in enumerate(texts) if not str(text).strip()]
        if empty:
            raise DataError(f"utterance {empty[0]} of the {len(texts)} given is empty: give every utterance some text.")
        ids, _ = _text_tokenizer(self.tokenizer, self.max_tokens).encode([str(text).strip() for text in texts])
        return trimmed(torch.from_numpy(ids).long())

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token id rows [n, L] back to text (padding dropped): for tables of utterances the model read."""
        tokenizer = _text_tokenizer(self.tokenizer, self.max_tokens).tokenizer
        return [tokenizer.decode([int(i) for i in row if int(i) != PAD_ID]) for row in ids.tolist()]


@functools.lru_cache(maxsize=4)
def _text_tokenizer(path: str | None, max_tokens: int) -> TextTokenizer:
    """One loaded tokenizer per (file, max_tokens) for the whole process: a learner's every call reuses it."""
    return TextTokenizer(path, max_tokens)


def _used_length(ids: torch.Tensor) -> torch.Tensor:
    """The number of leading columns of `ids` [..., L] that hold a token in some row (padding is PAD_ID at the end)."""
    used = (ids != PAD_ID).flatten(0, -2).any(dim=0)
    return used.nonzero().max() + 1 if bool(used.any()) else torch.tensor(0)


def trimmed(ids: torch.Tensor) -> torch.Tensor:
    """Token ids [..., L] without the columns that are padding in every row (at least one column kept)."""
    return ids[..., : max(int(_used_length(ids)), 1)]
