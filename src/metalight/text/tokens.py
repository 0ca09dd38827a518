"""Utterances as token ids: a `tokenizers` JSON (WordLlama's unless data.tokenizer names one), padded int32 rows, cached on disk.

A data set is tokenized once into `<cache_dir>/<name>.npy`: int32 [n_utterances, max_tokens], each row the
utterance's ids (no special tokens, as WordLlama encodes) cut at max_tokens and padded with PAD_ID, class after
class, with the class names, counts and how many utterances were cut in its sidecar (data/cache.py). The key holds
the source's content hash and size, the tokenizer file's hash, max_tokens and the reader's options, so a changed
file, tokenizer or length builds the cache again, and a hit reads neither the source nor the tokenizer's output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metalight.data.cache import load_cache, write_cache
from metalight.data.images import SplitImages
from metalight.errors import ConfigError
from metalight.text.pretrained import ADD_SPECIAL_TOKENS, PAD_ID, tokenizer_file

if TYPE_CHECKING:  # the text extra (pip install 'metalight[text]'); imported when a tokenizer is first loaded
    from tokenizers import Tokenizer

TOKEN_DTYPE = np.int32


def content_identity(path: Path) -> list:
    """What identifies a text source for a cache: its absolute path, and per file its name, size and sha256 (a folder: its .txt files)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), [[p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()] for p in files]]


class TextTokenizer:
    """How utterances become ids: the tokenizers JSON of data.tokenizer (null: WordLlama's) and data.max_tokens.

    The tokenizer itself is loaded on first use (a cache hit needs only the file's hash), with its own padding and
    truncation off. ConfigError when the file is missing or unreadable, or when its id PAD_ID is an ordinary token
    (padding would read as that token).
    """

    def __init__(self, path: str | None, max_tokens: int) -> None:
        self.path, self.max_tokens = path, max_tokens
        self.file = tokenizer_file() if path is None else Path(path)
        if not self.file.is_file():
            raise ConfigError(f"data.tokenizer={path}: no such file: give the path of a tokenizers JSON, or null for WordLlama's.")
        self._tokenizer: Tokenizer | None = None  # loaded on first use

    @property
    def tokenizer(self) -> Tokenizer:
        """The loaded tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer

    def _load(self) -> Tokenizer:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(self.file))
        except Exception as exc:  # tokenizers raises its own Exception type for a malformed file
            raise ConfigError(
                f"data.tokenizer={self.path}: cannot load it as a Hugging Face tokenizers JSON ({exc}): give the path of "
                "a tokenizer.json, or null for WordLlama's."
            ) from exc
        if self.path is not None:
            special = tokenizer.get_added_tokens_decoder().get(PAD_ID)
            if special is None or not special.special:
                raise ConfigError(
                    f"data.tokenizer={self.path}: its id {PAD_ID} is the ordinary token {tokenizer.id_to_token(PAD_ID)!r}, "
                    f"but utterances are padded with id {PAD_ID}: use a tokenizer whose id {PAD_ID} is a special (padding) token."
                )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    def key(self) -> dict:
        """What a token cache depends on besides its source: the tokenizer file's content, max_tokens, padding and special tokens."""
        digest = hashlib.sha256(self.file.read_bytes()).hexdigest()
        return {"tokenizer": digest, "max_tokens": self.max_tokens, "pad_id": PAD_ID, "special_tokens": ADD_SPECIAL_TOKENS}

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids [n, max_tokens] of `texts` (cut at max_tokens, padded with PAD_ID) and each text's full token count [n]."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=ADD_SPECIAL_TOKENS)
        ids = np.full((len(texts), self.max_tokens), PAD_ID, dtype=TOKEN_DTYPE)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            kept = encoding.ids[: self.max_tokens]
            ids[row, : len(kept)] = kept
            lengths[row] = len(encoding.ids)
        return ids, lengths


@dataclass(frozen=True)
class TokenizedSet:
    """A tokenized source: its classes as a SplitImages over the id rows, and how many of its utterances were cut."""

    split: SplitImages
    cut: int
    longest: int
    source: str

    @property
    def utterances(self) -> int:
        """How many utterances the source holds."""
        return int(self.split.counts.sum())


def tokenized(
    cache_dir: Path, name: str, identity: list, read: Callable[[], dict[str, list[str]]], tokenizer: TextTokenizer, options: dict
) -> TokenizedSet:
    """Source `identity`'s utterances as token ids, from the cache `name` or, when it does not match, read() and tokenized.

    read() gives {class: [utterance, ...]} (called on a miss only); `options` (the reader's settings) join the key.
    """
    key = {"kind": "tokens", "source": identity, **tokenizer.key(), "options": options}
    hit = load_cache(cache_dir, name, key, TOKEN_DTYPE)
    if hit is None:
        classes = read()
        ids, lengths = tokenizer.encode([text for utterances in classes.values() for text in utterances])
        info = {
            "classes": list(classes), "counts": [len(u) for u in classes.values()],
            "cut": int((lengths > tokenizer.max_tokens).sum()), "longest": int(lengths.max(initial=0)),
        }
        hit = write_cache(cache_dir, name, key, ids.shape, lambda out: out.__setitem__(Ellipsis, ids), info, TOKEN_DTYPE)
    array, info = hit
    return TokenizedSet(SplitImages.grouped(info["classes"], array, info["counts"]), info["cut"], info["longest"], identity[0])
