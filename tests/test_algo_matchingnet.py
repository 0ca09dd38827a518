"""Matching Networks: the attention against a cosine softmax computed by hand, the task loss against a pair-by-pair
computation, full context embeddings against torch's LSTMs, vmap = loop, metrics without an inner loop, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4
from torch import nn

from metalight.algorithms import MatchingNet
from metalight.algorithms.optimization.functional import run_tasks, split_state
from metalight.algorithms.metric.matchingnet import FullContextEmbedding, cosine_attention, matching_log_probs
from metalight.errors import ConfigError
from metalight.runs import cli
from metalight.runs.training import train
from metalight.tasks.kinds import REGRESSION

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def test_attention_is_the_softmax_of_cosine_similarities_by_hand():
    queries = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=F64)
    support = torch.tensor([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]], dtype=F64)
    r = 1 / math.sqrt(2)
    cosines = [[1.0, 0.0, r], [r, r, 1.0]]  # query 1 is along x; query 2 along the diagonal, as support 3
    expected = torch.tensor([[math.exp(c) / sum(math.exp(d) for d in row) for c in row] for row in cosines], dtype=F64)
    torch.testing.assert_close(cosine_attention(queries, support), expected, rtol=1e-12, atol=1e-12)
    # support labels 0, 1, 1: class 1 collects the attention of supports 2 and 3
    probs = matching_log_probs(expected, torch.tensor([0, 1, 1]), 2).exp()
    torch.testing.assert_close(probs, torch.stack([expected[:, 0], expected[:, 1] + expected[:, 2]], dim=1), rtol=1e-12, atol=1e-12)
    # support norms only: query 2's norm (2 * sqrt(2)) multiplies its similarities before the softmax
    scaled = [[1.0, 0.0, r], [2.0, 2.0, 4.0 * r]]
    expected_scaled = torch.tensor([[math.exp(c) / sum(math.exp(d) for d in row) for c in row] for row in scaled], dtype=F64)
    torch.testing.assert_close(cosine_attention(queries, support, normalize_queries=False), expected_scaled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_task_loss_is_the_nll_of_attention_weighted_labels(path):
    matching = MatchingNet(tiny_conv4(n_way=3, dtype=F64), task_parallel=path)
    batch = make_batch(2, n_way=3, k_shot=2, k_query=2, dtype=F64)
    params, _ = split_state(matching.model)
    outcome = run_tasks(matching.task_fn(3, keep_logits=True), params, batch, None, path, second_order=False)
    for i in range(2):
        task = {k: v[i] for k, v in batch.items()}
        embedded = matching.model(torch.cat([task["support_x"], task["query_x"]])).detach()
        support, queries = embedded[: len(task["support_x"])], embedded[len(task["support_x"]) :]
        rows = []
        for q in queries:  # one pair at a time
            weights = torch.stack([torch.exp(F.cosine_similarity(q, s, dim=0)) for s in support])
            weights = weights / weights.sum()
            rows.append(torch.stack([weights[task["support_y"] == k].sum() for k in range(3)]))
        probs = torch.stack(rows)
        torch.testing.assert_close(outcome.logits[i, 0].exp(), probs, rtol=1e-10, atol=1e-12)
        nll = -probs[torch.arange(len(queries)), task["query_y"]].log().mean()
        torch.testing.assert_close(outcome.loss[i].detach(), nll, rtol=1e-10, atol=1e-12)


def test_full_context_embeddings_match_torch_lstms():
    torch.manual_seed(0)
    dim, steps = 5, 3
    fce = FullContextEmbedding(dim, steps).to(F64)
    support, queries = torch.randn(4, dim, dtype=F64), torch.randn(2, dim, dtype=F64)
    lstm = nn.LSTM(dim, dim, bidirectional=True).to(F64)
    cell = nn.LSTMCell(dim, dim).to(F64)
    with torch.no_grad():
        for ours, suffix in ((fce.forward_cell, ""), (fce.backward_cell, "_reverse")):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l0{suffix}").copy_(getattr(ours, name))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(fce.query_cell, name))
        out, _ = lstm(support.unsqueeze(1))
        g = out[:, 0, :dim] + out[:, 0, dim:] + support  # forward + backward + skip (appendix A.2)
        h_hat, c = torch.zeros_like(queries), torch.zeros_like(queries)
        for _ in range(steps):  # appendix A.1, hidden state h + r as oscarknagg/few-shot
            h = h_hat + queries
            r = (h @ g.T).softmax(-1) @ g
            h_hat, c = cell(queries, (h + r, c))
        got_g, got_f = fce(support, queries)
    torch.testing.assert_close(got_g, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_f, h_hat + queries, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fce", [False, True])
def test_vmap_and_loop_meta_gradients_agree(fce):
    grads = {}
    for path in ("loop", "vmap"):
        matching = MatchingNet(tiny_conv4(dtype=F64), task_parallel=path, fce=fce)
        params, _ = split_state(matching.model)
        loss = run_tasks(matching.task_fn(3), params, make_batch(3, dtype=F64), None, path, second_order=False).loss.mean()
        grads[path] = torch.autograd.grad(loss, list(params.values()))
    assert len(grads["loop"]) == len(list(split_state(matching.model)[0])) and any(g.abs().sum() > 0 for g in grads["loop"])
    for a, b in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_trains_and_tests_without_inner_loop_metrics():
    matching = MatchingNet(tiny_conv4(n_way=3), fce=True)
    trainer = make_trainer(max_steps=4, limit_val_batches=2, val_check_interval=4)
    trainer.fit(matching, loader(TrainStream(4, 4, n_way=3, k_shot=2, k_query=3)), loader(EvalTasks(4, 2, n_way=3, k_shot=1)))
    assert {"train/loss", "train/acc", "val/acc", "val/acc_ci95", "val/loss"} <= set(trainer.callback_metrics)
    assert not {"train/acc_before", "train/inner_lr", "val/acc_before", "val/acc_step0"} & set(trainer.callback_metrics)
    trainer.test(matching, loader(EvalTasks(5, 2, n_way=2, k_shot=2)), verbose=False)
    assert set(matching.test_results) == {"acc", "acc_ci95", "loss", "n_tasks"} and matching.test_results["n_tasks"] == 5


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="Matching Networks needs a model with a separable head"):
        MatchingNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(ConfigError, match="algo.fce_steps=0"):
        MatchingNet(tiny_conv4(), fce=True, fce_steps=0)
    with pytest.raises(ConfigError, match="algo=MatchingNet learns classification tasks only"):
        MatchingNet.check_task_kind(REGRESSION)


def test_regression_data_stops_with_one_line(compose_generated, capsys, caplog):
    cfg = compose_generated("data=sinusoid", "algo=matchingnet")
    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(train, cfg)
    assert stopped.value.code == 2
    # the one line goes to stderr through the metalight logger (pytest captures it in caplog or capsys)
    printed = [line for line in (capsys.readouterr().err + caplog.text).splitlines() if "Error" in line]
    assert len(set(printed)) == 1 and "algo=MatchingNet learns classification tasks only" in printed[0] and "gives regression tasks" in printed[0]
