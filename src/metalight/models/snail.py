"""SNAIL's sequence network (Mishra et al. 2018): dense blocks of causal dilated convolutions (TC blocks) and causal attention.

Every block concatenates its output to its input, so position t of every layer sees positions <= t only.
Two ways to run it, which give the same numbers:

* `forward(sequences)`: whole sequences [B, T, C] at once, the reference form;
* `forward(prefix, queries)`: a shared prefix [S, C] (a task's labelled support examples) continued by each
  of Q queries [Q, C] alone, as Q sequences of length S + 1. The prefix is run once; each query's last
  position is computed from the prefix's features at every layer (`extend`), which is what causality allows.
  Since every block concatenates, a block's input on the prefix is the first channels of the prefix's final
  features: `extend(prefix, queries)` takes those final features and slices what it reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.errors import ConfigError


def tc_dilations(sequence_length: int) -> list[int]:
    """The paper's TCBlock dilations 2^i for i = 1..ceil(log2 T) (Algorithm 2; eambutu/snail-pytorch's blocks.py likewise)."""
    return [2**i for i in range(1, math.ceil(math.log2(sequence_length)) + 1)]


class DenseBlock(nn.Module):
    """Two causal convolutions of kernel 2 and one dilation, gated tanh * sigmoid, concatenated to the input: C -> C + filters."""

    def __init__(self, in_channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2, dilation=dilation)  # the two convolutions, stacked

    def gate(self, pre: Tensor) -> Tensor:
        """tanh(xf) * sigmoid(xg) of the stacked pre-activations [..., 2 * filters]."""
        xf, xg = pre.chunk(2, dim=-1)
        return torch.tanh(xf) * torch.sigmoid(xg)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C + filters]: position t reads inputs t and t - dilation (zeros before the start)."""
        pre = self.conv(F.pad(x.transpose(1, 2), (self.dilation, 0))).transpose(1, 2)
        return torch.cat([x, self.gate(pre)], dim=-1)

    def extend(self, prefix: Tensor, queries: Tensor) -> Tensor:
        """Position S of each sequence [prefix [S, >=C], query]: queries [Q, C] -> [Q, C + filters]."""
        prefix = prefix[:, : queries.shape[-1]]
        past_tap, now_tap = self.conv.weight[..., 0], self.conv.weight[..., 1]
        start = len(prefix) - self.dilation
        pre = F.linear(queries, now_tap, self.conv.bias)
        if start >= 0:
            pre = pre + F.linear(prefix[start], past_tap)
        return torch.cat([queries, self.gate(pre)], dim=-1)


class TCBlock(nn.Module):
    """Dense blocks of dilations 2, 4, ..., 2^ceil(log2 T), enough for position T - 1 to reach position 0's neighbourhood."""

    def __init__(self, in_channels: int, sequence_length: int, filters: int) -> None:
        super().__init__()
        dilations = tc_dilations(sequence_length)
        self.blocks = nn.ModuleList(DenseBlock(in_channels + i * filters, filters, d) for i, d in enumerate(dilations))
        self.out_channels = in_channels + len(dilations) * filters

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C + levels * filters]."""
        for block in self.blocks:
            x = block(x)
        return x

    def extend(self, prefix: Tensor, queries: Tensor) -> Tensor:
        """Last position of [prefix, query] per query, from the prefix's final features [S, >=C]."""
        for block in self.blocks:
            queries = block.extend(prefix, queries)
        return queries


class AttentionBlock(nn.Module):
    """Causal single-head soft attention (key size K, value size V), the read concatenated to the input: C -> C + V."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def weights(self, x: Tensor) -> Tensor:
        """Attention [B, T, T] of every position over the positions up to it (rows sum to 1, zeros above the diagonal)."""
        logits = self.query(x) @ self.key(x).transpose(1, 2) * self.scale
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return logits.masked_fill(future, float("-inf")).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C + V]."""
        return torch.cat([x, self.weights(x) @ self.value(x)], dim=-1)

    def extend_weights(self, prefix: Tensor, queries: Tensor) -> Tensor:
        """Attention [Q, S + 1] of each query's last position over the prefix [S, >=C] and itself."""
        prefix = prefix[:, : queries.shape[-1]]
        q = self.query(queries)
        logits = torch.cat([q @ self.key(prefix).T, (q * self.key(queries)).sum(-1, keepdim=True)], dim=-1)
        return (logits * self.scale).softmax(dim=-1)

    def extend(self, prefix: Tensor, queries: Tensor) -> Tensor:
        """Last position of [prefix, query] per query: queries [Q, C] -> [Q, C + V]."""
        prefix = prefix[:, : queries.shape[-1]]
        values = torch.cat([self.value(prefix).expand(len(queries), -1, -1), self.value(queries).unsqueeze(1)], dim=1)
        read = (self.extend_weights(prefix, queries).unsqueeze(1) @ values).squeeze(1)
        return torch.cat([queries, read], dim=-1)


class SNAILNet(nn.Module):
    """Embedding -> a linear layer to `embedding` -> [embedding, one-hot label] -> SNAIL blocks -> a linear layer to n_way logits.

    blocks: the paper's sizes as ["attention", key, value] and ["tc", filters] entries (Omniglot and
    miniImageNet: attention 64/32, tc 128, attention 256/128, tc 128, attention 512/256); a TC block's
    levels are ceil(log2 sequence_length). The final 1x1 convolution of the paper is a linear layer per position.
    """

    def __init__(self, feature_dim: int, n_way: int, sequence_length: int, blocks: list, embedding: int = 64) -> None:
        super().__init__()
        self.n_way, self.sequence_length = n_way, sequence_length
        self.embed = nn.Linear(feature_dim, embedding)
        channels, layers = embedding + n_way, []
        for spec in blocks:
            kind, *sizes = list(spec)
            if kind == "attention" and len(sizes) == 2:
                layers.append(AttentionBlock(channels, int(sizes[0]), int(sizes[1])))
            elif kind == "tc" and len(sizes) == 1:
                layers.append(TCBlock(channels, sequence_length, int(sizes[0])))
            else:
                raise ConfigError(f"algo.blocks entry {list(spec)!r} is not known: use [attention, key_size, value_size] or [tc, filters] (the paper: [[attention, 64, 32], [tc, 128], [attention, 256, 128], [tc, 128], [attention, 512, 256]]).")
            channels = layers[-1].out_channels
        if not any(isinstance(layer, AttentionBlock) for layer in layers):
            raise ConfigError("algo.blocks has no attention block: SNAIL reads the support set through attention; add [attention, key_size, value_size].")
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(channels, n_way)

    def inputs(self, features: Tensor, labels: Tensor | None) -> Tensor:
        """Sequence entries [..., embedding + n_way]: the embedded features and one-hot labels (zeros where a label is -1 or labels is None)."""
        embedded = self.embed(features)
        if labels is None:
            return torch.cat([embedded, embedded.new_zeros(*embedded.shape[:-1], self.n_way)], dim=-1)
        one_hot = (labels.unsqueeze(-1) == torch.arange(self.n_way, device=labels.device)).to(embedded.dtype)
        return torch.cat([embedded, one_hot], dim=-1)

    def check_length(self, length: int) -> None:
        """ConfigError when sequences are longer than the TC blocks' dilations were sized for."""
        if length > self.sequence_length:
            raise ConfigError(
                f"SNAIL was built for sequences of {self.sequence_length} = data.n_way * data.k_shot + 1 examples, but got "
                f"{length}: its TC blocks' dilations do not reach that far back. Train and test with the same data.n_way and "
                "data.k_shot (leave data.n_way_train and data.k_shot_train unset)."
            )

    def forward(self, features: Tensor, labels: Tensor, queries: Tensor | None = None, attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of whole sequences, or of each query continuing one labelled prefix.

        queries None: features [B, T, F] and labels [B, T] (-1: no label) -> logits [B, T, n_way] at every position.
        queries [Q, F]: the prefix's features [S, F] and labels [S] -> logits [Q, n_way] of each sequence
        [prefix, query] at its last position; attention=True also returns the last attention block's weights
        [Q, S + 1] from each query over the prefix and itself.
        """
        x = self.inputs(features, labels)
        if queries is None:
            self.check_length(x.shape[1])
            for layer in self.layers:
                x = layer(x)
            return self.out(x)
        self.check_length(x.shape[0] + 1)
        queries = self.inputs(queries, None)
        prefix = x.unsqueeze(0)
        for layer in self.layers:
            prefix = layer(prefix)
        prefix = prefix[0]
        last = None
        for layer in self.layers:
            if attention and isinstance(layer, AttentionBlock):
                last = layer.extend_weights(prefix, queries)
            queries = layer.extend(prefix, queries)
        logits = self.out(queries)
        return (logits, last) if attention else logits
