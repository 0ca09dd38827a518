"""Matching Networks (Vinyals et al. 2016): a query's class probabilities are its softmax attention over the support set, weighting their one-hot labels."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.base import OptimizerFactory, SchedulerFactory, require_features_and_head
from metalight.algorithms.metric.learner import MetricLearner, embed_task
from metalight.algorithms.optimization.functional import Params, TaskOutcome, _prefixed, split_state
from metalight.errors import ConfigError
from metalight.tasks.kinds import accuracy

EPSILON = 1e-8  # probabilities are clamped to at least this before the log (oscarknagg/few-shot's EPSILON)


def cosine_attention(queries: Tensor, support: Tensor, normalize_queries: bool = True) -> Tensor:
    """Attention [Q, S]: softmax over the support examples of the cosine similarity of each query [Q, D] to each support embedding [S, D].

    normalize_queries=False divides by the support norms only, so the query's norm scales the softmax.
    """
    queries = F.normalize(queries, dim=-1) if normalize_queries else queries
    return (queries @ F.normalize(support, dim=-1).T).softmax(dim=-1)


def matching_log_probs(attention: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """log of the class probabilities [Q, n_way]: attention [Q, S] times the support's one-hot labels, clamped at EPSILON."""
    probs = attention @ F.one_hot(support_y, n_way).to(attention.dtype)
    return probs.clamp_min(EPSILON).log()


class LSTMCell(nn.Module):
    """An LSTM cell (nn.LSTMCell's weights, gates and initialization) written with F.linear, so that torch.func.vmap takes it."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1 / math.sqrt(hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(h, c) after one step on input x [B, input_size] from state (h, c) [B, hidden_size] each."""
        h, c = state
        i, f, g, o = (F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class FullContextEmbedding(nn.Module):
    """Vinyals et al.'s full context embeddings (appendix A), as oscarknagg/few-shot's BidrectionalLSTM and AttentionLSTM.

    support(s) [S, D]: a bidirectional LSTM (hidden size D) runs over the support set in its order;
    g(x_i, S) = forward h_i + backward h_i + g'(x_i). queries(q, g) [Q, D]: `steps` read-outs of an
    attention LSTM: h = ĥ + f'(x), a = softmax(h g^T), r = a g, (ĥ, c) = LSTM(f'(x), (h + r, c)) (their
    reading of the paper's [h, r] as a sum, which keeps the hidden size D), and f(x, S) = ĥ + f'(x) at the end.
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.forward_cell, self.backward_cell, self.query_cell = LSTMCell(dim, dim), LSTMCell(dim, dim), LSTMCell(dim, dim)

    def support(self, s: Tensor) -> Tensor:
        """g(x_i, S) [S, D] of support embeddings s [S, D] (the sequence in the support set's order)."""
        def run(cell: LSTMCell, sequence: Tensor) -> Tensor:
            h = c = sequence.new_zeros(1, sequence.shape[1])
            outputs = []
            for x in sequence:
                h, c = cell(x.unsqueeze(0), (h, c))
                outputs.append(h[0])
            return torch.stack(outputs)

        return run(self.forward_cell, s) + run(self.backward_cell, s.flip(0)).flip(0) + s

    def queries(self, q: Tensor, g: Tensor) -> Tensor:
        """f(x, S) [Q, D] of query embeddings q [Q, D], attending over the support's full context embeddings g [S, D]."""
        h_hat, c = torch.zeros_like(q), torch.zeros_like(q)
        for _ in range(self.steps):
            h = h_hat + q
            readout = (h @ g.T).softmax(dim=-1) @ g
            h_hat, c = self.query_cell(q, (h + readout, c))
        return h_hat + q

    def forward(self, support: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(g(support), f(queries)) of embeddings [S, D] and [Q, D]."""
        g = self.support(support)
        return g, self.queries(queries, g)


class MatchingNet(MetricLearner):
    """Matching Networks: no inner loop; P(y | x, S) = sum_i a(x, x_i) y_i with a the softmax of cosine similarities.

    The model's `features` embed the images (its linear head is dropped; embeddings are flattened). Each
    query attends to every support example by the softmax of their cosine similarities; its class
    probabilities are the attention-weighted sum of the support one-hot labels, and the loss is their
    negative log-likelihood (probabilities clamped at 1e-8 before the log). Where the paper leaves details
    open we follow oscarknagg/few-shot (few_shot/matching.py, few_shot/models.py): the encoder shared by
    support and queries, Adam 1e-3, the clamp, and full context embeddings read as theirs. fce=true adds
    the paper's full context embeddings (FullContextEmbedding: a bidirectional LSTM over the support set,
    an attention LSTM with fce_steps read-outs for the queries; theirs defaults to 2); off by default, as in
    most re-implementations and the paper's Omniglot results (it reports FCE for miniImageNet).
    normalize_queries=false divides by the support norms only (sicara/easyfsl and AntreasAntoniou/
    MatchingNetworks do, after facebookresearch/low-shot-shrink-hallucinate): the query's norm then sharpens
    the softmax; true is the paper's cosine. BatchNorm as ProtoNet: with model.track_running_stats=true
    (the matchingnet_* protocols) evaluation runs in eval mode, inductive (oscarknagg's model.eval());
    otherwise `transductive` chooses one batch for support and queries or each query with the support set.
    Logits (eval.py, FewShotLearner) are the log-probabilities.
    Differences from oscarknagg/few-shot, declared (RESULTS.md's differences table): theirs clips the gradient
    norm at 1 after every episode (few_shot/matching.py) and halves the LR when the validation accuracy has not
    improved for 20 epochs of 100 episodes (experiments/matching_nets.py: ReduceLROnPlateau(patience=20,
    factor=0.5)); ours clips only with algo.gradient_clip_val=1.0 (null in the protocols, whose RESULTS rows
    were trained so) and keeps the LR constant (no plateau scheduler).
    """


    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
        fce: bool = False,
        fce_steps: int = 2,
        normalize_queries: bool = True,
    ) -> None:
        require_features_and_head(model, "Matching Networks")
        if isinstance(fce_steps, bool) or not isinstance(fce_steps, int) or fce_steps < 1:
            raise ConfigError(f"algo.fce_steps={fce_steps!r} is not valid: use a whole number >= 1 (read-outs of the attention LSTM; oscarknagg/few-shot: 2).")
        if fce:
            if not isinstance(model.head, nn.Linear):
                raise ConfigError(
                    f"algo.fce=true sizes its LSTMs by the embedding, read from the model's linear head, but {type(model).__name__}'s "
                    f"head is a {type(model.head).__name__}: use model=conv4, conv4_strided, conv4_mini, resnet12 or timm, or algo.fce=false."
                )
            model.fce = FullContextEmbedding(model.head.in_features, fce_steps).to(model.head.weight.dtype)
        model.head = nn.Identity()  # model(x) is now the embedding
        super().__init__(model, optimizer, scheduler, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.fce, self.normalize_queries = fce, normalize_queries

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam(lr=1e-3), oscarknagg/few-shot's optimizer."""
        return torch.optim.Adam(params, lr=1e-3)

    def task_fn(self, n_way: int, keep_logits: bool = False) -> Callable[..., TaskOutcome]:
        """(params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one task, as run_tasks takes it; logits are log-probabilities."""
        _, fixed = split_state(self.model)
        transductive, fce, normalize_queries = self.transductive, self.fce, self.normalize_queries

        def embed(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.model, (params, fixed), (x,)).flatten(1)

        def run(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, indices: None) -> TaskOutcome:
            support, queries = embed_task(lambda x: embed(params, x), support_x, query_x, transductive)
            if fce:
                support, queries = functional_call(self.model.fce, _prefixed(params, "fce"), (support, queries))
            log_probs = matching_log_probs(cosine_attention(queries, support, normalize_queries), support_y, n_way)
            kept = log_probs.detach().unsqueeze(0) if keep_logits else log_probs.new_zeros(0)
            return TaskOutcome(F.nll_loss(log_probs, query_y), accuracy(log_probs.detach(), query_y).unsqueeze(0), {}, kept)

        return run
