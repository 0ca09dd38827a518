"""Text encoders for few-shot classification: token ids [n, L] (padded with PAD_ID) -> embeddings [n, d] (`features`), then a linear `head`.

Every encoder starts with a `TokenEmbedding`: WordLlama's pretrained 32,000 x 256 table (frozen by default)
or a random one. The pad rows never reach the output: pooling masks them out. MAML-family learners adapt
every trainable weight in their inner loop except those a model lists in `not_adapted`: a text encoder
lists its table there unless `adapt_embeddings=true`, so a trainable table is meta-learned by the outer
loop only (a 32,000-row inner step would cost more than the rest of the network and overfit one support set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.errors import ConfigError
from metalight.text.pretrained import EMBEDDING_DIM, PAD_ID, VOCAB_SIZE, load_embeddings

EMBEDDINGS = ("pretrained", "random")
TABLE = "features.embedding.weight"  # the table's name in every encoder (features.embedding is a TokenEmbedding)


def _whole(value: object, key: str, smallest: int = 1) -> int:
    """`value` when it is a whole number >= smallest, else ConfigError naming model.<key>."""
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise ConfigError(f"model.{key}={value!r} is not valid: use a whole number >= {smallest}.")
    return value


class TokenEmbedding(nn.Module):
    """A token table [VOCAB_SIZE, dim]: WordLlama's (embeddings="pretrained", dim 256) or N(0, 1) rows ("random", any dim).

    freeze=True keeps it out of every optimizer (requires_grad=False). A frozen pretrained table is read from
    the wordllama wheel whenever the model is built, so it is left out of state_dict (checkpoints are 33 MB
    smaller) and put back from the wheel when a state dict without it is loaded.
    """

    def __init__(self, embeddings: str = "pretrained", freeze: bool = True, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        if embeddings not in EMBEDDINGS:
            raise ConfigError(f"model.embeddings={embeddings!r} is not known: use pretrained (WordLlama's table) or random.")
        if embeddings == "pretrained":
            if dim != EMBEDDING_DIM:
                raise ConfigError(f"model.embedding_dim={dim} but WordLlama's pretrained table has {EMBEDDING_DIM} columns: set model.embedding_dim={EMBEDDING_DIM}, or model.embeddings=random.")
            table = load_embeddings()
        else:
            table = torch.randn(VOCAB_SIZE, _whole(dim, "embedding_dim"))  # nn.Embedding's init; the pretrained rows have std 0.91
        self.weight = nn.Parameter(table, requires_grad=not freeze)
        if embeddings == "pretrained" and freeze:
            self._register_state_dict_hook(_drop_table)
            self.register_load_state_dict_pre_hook(_restore_table)

    @property
    def dim(self) -> int:
        """Columns of the table."""
        return self.weight.shape[1]

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded tokens [n, L, dim] (zero at pads) and the mask of real tokens [n, L] (float)."""
        mask = (ids != PAD_ID).to(self.weight.dtype)
        return F.embedding(ids, self.weight) * mask.unsqueeze(-1), mask


def _drop_table(module: TokenEmbedding, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: leave the frozen pretrained table out (the wheel holds it)."""
    state_dict.pop(prefix + "weight", None)


def _restore_table(module: TokenEmbedding, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a state dict saved without the frozen pretrained table gets the one read from the wheel."""
    state_dict.setdefault(prefix + "weight", module.weight.detach())


def _mlp(width: int, widths: Sequence[int]) -> tuple[nn.Module, int]:
    """Linear layers of `widths` after an input of `width`, ReLU between them (none after the last); and the output width."""
    layers: list[nn.Module] = []
    for i, out in enumerate(widths):
        layers += [nn.Linear(width, _whole(out, "hidden")), nn.ReLU()]
        width = out
    return nn.Sequential(*layers[:-1]), width


class BagFeatures(nn.Module):
    """The mean of an utterance's token embeddings over its real tokens (WordLlama's own sentence embedding), then an MLP.

    normalize: the mean scaled to unit length first (WordLlama's embed(norm=True)): squared Euclidean distances
    between unit vectors order as cosine similarities, WordLlama's own measure. residual: the MLP's output is
    added to its input, and its last layer starts at zero, so an untrained network is the pooled embedding itself.
    """

    def __init__(self, embedding: TokenEmbedding, hidden: Sequence[int], normalize: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.embedding, self.normalize, self.residual = embedding, normalize, residual
        self.mlp, self.dim = _mlp(embedding.dim, hidden)
        if residual:
            if self.dim != embedding.dim or not hidden:
                raise ConfigError(f"model.residual=true adds the MLP's output to the {embedding.dim}-d mean: its last width (model.hidden={list(hidden)}) must be {embedding.dim}.")
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, ids: Tensor) -> Tensor:
        """Embeddings [n, dim] of token ids [n, L]."""
        tokens, mask = self.embedding(ids)
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # an all-pad row embeds to 0
        if self.normalize:
            mean = F.normalize(mean, dim=-1)
        return mean + self.mlp(mean) if self.residual else self.mlp(mean)


class CNNFeatures(nn.Module):
    """Conv1d over the token embeddings, one bank of `filters` per width, ReLU, max over the positions within the utterance; concatenated.

    Convolutions are unpadded (Bao et al.'s CNN); an utterance shorter than a filter is padded with zero
    embeddings to its width and pooled over that one window, so no window that starts past its last token counts.
    """

    def __init__(self, embedding: TokenEmbedding, widths: Sequence[int], filters: int) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("model.widths is empty: give the CNN at least one filter width, e.g. [3, 4, 5].")
        self.embedding = embedding
        self.widths = [_whole(w, "widths") for w in widths]
        self.convs = nn.ModuleList(nn.Conv1d(embedding.dim, _whole(filters, "filters"), w) for w in self.widths)
        self.dim = filters * len(self.widths)

    def forward(self, ids: Tensor) -> Tensor:
        """Embeddings [n, filters * len(widths)] of token ids [n, L]."""
        tokens, mask = self.embedding(ids)
        x = F.pad(tokens.transpose(1, 2), (0, max(max(self.widths) - ids.shape[1], 0)))  # [n, dim, >= widest filter]
        lengths = mask.sum(1, keepdim=True)
        pooled = []
        for width, conv in zip(self.widths, self.convs):
            out = conv(x)  # [n, filters, L' - width + 1]
            positions = torch.arange(out.shape[-1], device=ids.device)
            inside = positions < (lengths - width + 1).clamp_min(1)  # windows that start at a real token and fit, or the first
            pooled.append(out.masked_fill(~inside.unsqueeze(1), float("-inf")).amax(-1))
        return F.relu(torch.cat(pooled, 1))


def token_embedding(embeddings: str, freeze_embeddings: bool | None, adapt_embeddings: bool, dim: int) -> TokenEmbedding:
    """The encoders' table from their model.* options; freeze_embeddings=None freezes a pretrained table and trains a random one."""
    freeze = embeddings == "pretrained" if freeze_embeddings is None else bool(freeze_embeddings)
    if freeze and adapt_embeddings:
        raise ConfigError(
            "model.adapt_embeddings=true adapts the token table in the inner loop, but it is frozen (model.freeze_embeddings, "
            "true by default for pretrained embeddings): set model.freeze_embeddings=false, or model.adapt_embeddings=false."
        )
    return TokenEmbedding(embeddings, freeze, dim)


class TextEncoder(nn.Module):
    """forward = head(features(ids)), a linear head over the body's output (width features.dim); modality = "text"."""

    modality = "text"

    def __init__(self, n_way: int, features: nn.Module, adapt_embeddings: bool) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.dim, _whole(n_way, "n_way (data.n_way)"))
        # weights MAML-family inner loops leave at their meta-values (functional.inner_weights)
        self.not_adapted: tuple[str, ...] = () if adapt_embeddings else (TABLE,)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits [n, n_way] of token ids [n, L]."""
        return self.head(self.features(ids))


class TextBag(TextEncoder):
    """A bag of embeddings: masked mean of the token embeddings, then an MLP (`hidden` widths; [] = the mean itself), linear head."""

    def __init__(
        self,
        n_way: int,
        hidden: Sequence[int] = (256, 256),
        normalize: bool = False,
        residual: bool = False,
        embeddings: str = "pretrained",
        freeze_embeddings: bool | None = None,
        adapt_embeddings: bool = False,
        embedding_dim: int = EMBEDDING_DIM,
    ) -> None:
        table = token_embedding(embeddings, freeze_embeddings, adapt_embeddings, embedding_dim)
        super().__init__(n_way, BagFeatures(table, list(hidden), normalize, residual), adapt_embeddings)


class TextCNN(TextEncoder):
    """A CNN over tokens: `filters` filters of each width in `widths`, ReLU, masked max-over-time pooling, concatenated; linear head."""

    def __init__(
        self,
        n_way: int,
        widths: Sequence[int] = (3, 4, 5),
        filters: int = 50,
        embeddings: str = "pretrained",
        freeze_embeddings: bool | None = None,
        adapt_embeddings: bool = False,
        embedding_dim: int = EMBEDDING_DIM,
    ) -> None:
        table = token_embedding(embeddings, freeze_embeddings, adapt_embeddings, embedding_dim)
        super().__init__(n_way, CNNFeatures(table, list(widths), filters), adapt_embeddings)
