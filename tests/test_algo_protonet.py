"""Prototypical Networks: logits against a brute-force distance computation, vmap = loop, other train/test ways and
shots, metrics without an inner loop, and the model contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4
from torch import nn

from metalight.algorithms import ProtoNet
from metalight.algorithms.optimization.functional import run_tasks, split_state
from metalight.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def brute_force_logits(model: nn.Module, task: dict[str, torch.Tensor], n_way: int) -> torch.Tensor:
    """-||f(q) - c_k||^2 for each query q and class k, one pair at a time, prototypes as plain averages."""
    embedded = model(torch.cat([task["support_x"], task["query_x"]]))
    support, queries = embedded[: len(task["support_x"])], embedded[len(task["support_x"]) :]
    centers = [torch.stack([support[i] for i in range(len(support)) if task["support_y"][i] == k]).mean(0) for k in range(n_way)]
    return torch.stack([torch.stack([-((q - c) ** 2).sum() for c in centers]) for q in queries])


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_logits_are_negative_squared_distances_to_the_prototypes(path):
    protonet = ProtoNet(tiny_conv4(n_way=4, dtype=F64), task_parallel=path)
    batch = make_batch(2, n_way=4, k_shot=3, k_query=2, dtype=F64)
    params, _ = split_state(protonet.model)
    outcome = run_tasks(protonet.task_fn(4, keep_logits=True), params, batch, None, path, second_order=False)
    for i in range(2):
        task = {k: v[i] for k, v in batch.items()}
        expected = brute_force_logits(protonet.model, task, 4)
        torch.testing.assert_close(outcome.logits[i, 0], expected.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(outcome.loss[i], F.cross_entropy(expected, task["query_y"]), rtol=1e-10, atol=1e-12)


def test_vmap_and_loop_meta_gradients_agree():
    grads = {}
    for path in ("loop", "vmap"):
        protonet = ProtoNet(tiny_conv4(dtype=F64), task_parallel=path)
        params, _ = split_state(protonet.model)
        loss = run_tasks(protonet.task_fn(3), params, make_batch(3, dtype=F64), None, path, second_order=False).loss.mean()
        grads[path] = torch.autograd.grad(loss, list(params.values()))
    for a, b in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_non_transductive_embeds_each_query_with_the_support_set():
    protonet = ProtoNet(tiny_conv4(dtype=F64), transductive=False)
    batch = make_batch(1, k_shot=2, dtype=F64)
    params, _ = split_state(protonet.model)
    outcome = run_tasks(protonet.task_fn(3, keep_logits=True), params, batch, None, "loop", second_order=False)
    task = {k: v[0] for k, v in batch.items()}
    support = protonet.model(task["support_x"])
    centers = torch.stack([support[task["support_y"] == k].mean(0) for k in range(3)])
    queries = torch.stack([protonet.model(torch.cat([task["support_x"], q[None]]))[-1] for q in task["query_x"]])
    torch.testing.assert_close(outcome.logits[0, 0], -torch.cdist(queries, centers).pow(2).detach(), rtol=1e-9, atol=1e-9)


def test_trains_with_more_ways_and_shots_than_it_is_tested_with():
    protonet = ProtoNet(tiny_conv4(n_way=3))
    trainer = make_trainer(max_steps=4, limit_val_batches=2, val_check_interval=4)
    trainer.fit(protonet, loader(TrainStream(4, 4, n_way=6, k_shot=3, k_query=4)), loader(EvalTasks(4, 2, n_way=3, k_shot=1)))
    assert {"train/loss", "train/acc", "val/acc", "val/acc_ci95", "val/loss"} <= set(trainer.callback_metrics)
    assert not {"train/acc_before", "train/inner_lr", "val/acc_before", "val/acc_step0"} & set(trainer.callback_metrics)
    trainer.test(protonet, loader(EvalTasks(5, 2, n_way=2, k_shot=2)), verbose=False)
    assert set(protonet.test_results) == {"acc", "acc_ci95", "loss", "n_tasks"} and protonet.test_results["n_tasks"] == 5


def test_head_is_dropped_and_a_model_without_features_is_refused():
    protonet = ProtoNet(tiny_conv4(hidden=4))
    assert not any(name.startswith("head.") for name, _ in protonet.model.named_parameters())
    assert protonet.model(torch.randn(2, 1, 8, 8)).shape == (2, 4)  # the embedding
    with pytest.raises(ConfigError, match="ProtoNets needs a model with a separable head"):
        ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
