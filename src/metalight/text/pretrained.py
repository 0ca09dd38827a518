"""WordLlama's tokenizer and token embeddings, read straight from the installed `wordllama` wheel, never downloaded.

The `wordllama` package (MIT licence; `pip install 'metalight[text]'`) ships a Llama-2 32,000-token BPE tokenizer
(Hugging Face `tokenizers` JSON) and a 32,000 x 256 float16 embedding table distilled from large language models
("l2_supercat", safetensors) inside its wheel. Its own loader may try the network, so we read the two files with
`tokenizers` and `safetensors` ourselves. WordLlama embeds a sentence as the mean of its tokens' rows over the
attention mask, encoded without special tokens and padded with id 0: PAD_ID and ADD_SPECIAL_TOKENS follow it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from metalight.errors import ConfigError

PAD_ID = 0
ADD_SPECIAL_TOKENS = False
VOCAB_SIZE = 32000
EMBEDDING_DIM = 256
_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
_EMBEDDINGS = "weights/l2_supercat_256.safetensors"


def wordllama_root() -> Path:
    """The installed wordllama package's folder, or ConfigError saying how to install it."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "Text tasks need the wordllama package (its tokenizer and pretrained embeddings): "
            "pip install 'metalight[text]' (make install does), or set data.tokenizer to your own tokenizers JSON."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def tokenizer_file() -> Path:
    """WordLlama's tokenizer JSON (Hugging Face `tokenizers`)."""
    return wordllama_root() / _TOKENIZER


def embeddings_file() -> Path:
    """WordLlama's 32,000 x 256 token embedding table (safetensors)."""
    return wordllama_root() / _EMBEDDINGS


def load_embeddings() -> torch.Tensor:
    """The pretrained token embedding table [VOCAB_SIZE, EMBEDDING_DIM] as float32."""
    from safetensors.torch import load_file

    table = load_file(str(embeddings_file()))["embedding.weight"]
    return table.float()
