"""Relation Networks: a score for every (query, class) pair in the right order and channel order, class maps summed over
shots, MSE on one-hot targets, vmap = loop, metrics without an inner loop, and the models it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4

from metalight.algorithms import RelationNet
from metalight.algorithms.optimization.functional import run_tasks, split_state
from metalight.algorithms.metric.relationnet import relation_pairs
from metalight.errors import ConfigError
from metalight.models.conv4_relation import Conv4Relation
from metalight.runs import cli
from metalight.runs.training import train
from metalight.tasks.kinds import REGRESSION

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def tiny_relation_net(dtype: torch.dtype = F64, **options) -> RelationNet:
    """Conv4Relation with 4 channels on 8x8 images (one pool: 4x4 maps) and a 4-channel relation module."""
    torch.manual_seed(0)
    model = Conv4Relation(1, 3, hidden=4, image_size=8, padding=[1, 1, 1, 1], pool=[True, False, False, False]).to(dtype)
    return RelationNet(model, relation_channels=4, **options)


def test_pairs_are_query_major_with_the_class_map_first():
    queries = torch.arange(2.0).view(2, 1, 1, 1)  # query q is the map of value q
    classes = 10 + torch.arange(3.0).view(3, 1, 1, 1)  # class c is the map of value 10 + c
    pairs = relation_pairs(queries, classes)
    assert pairs.shape == (6, 2, 1, 1)
    assert pairs[:, :, 0, 0].tolist() == [[10, 0], [11, 0], [12, 0], [10, 1], [11, 1], [12, 1]]


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_every_query_class_pair_is_scored_in_order(path):
    if path == "loop":  # the relation module's running statistics in eval mode: a pair's score does not depend on the other pairs
        relation = tiny_relation_net(task_parallel="loop", relation_running_stats=True)
        relation.model.relation.eval()
    else:  # vmap cannot update running statistics: batch statistics over the task's pairs
        relation = tiny_relation_net(task_parallel="vmap")
    batch = make_batch(2, n_way=3, k_shot=2, k_query=2, dtype=F64)
    params, _ = split_state(relation.model)
    outcome = run_tasks(relation.task_fn(3, keep_logits=True), params, batch, None, path, second_order=False)
    for i in range(2):
        task = {k: v[i] for k, v in batch.items()}
        with torch.no_grad():
            maps = relation.model(torch.cat([task["support_x"], task["query_x"]])).unflatten(1, (4, 4, 4))
            support, queries = maps[: len(task["support_x"])], maps[len(task["support_x"]) :]
            classes = [sum(support[j] for j in range(len(support)) if task["support_y"][j] == k) for k in range(3)]  # summed over shots
            if path == "loop":  # one pair at a time, the class's map first on channels
                expected = torch.stack([torch.stack([relation.model.relation(torch.cat([c, q])[None])[0] for c in classes]) for q in queries])
                swapped = torch.stack([torch.stack([relation.model.relation(torch.cat([q, c])[None])[0] for c in classes]) for q in queries])
                assert (expected - swapped).abs().max() > 1e-6, "the test case does not tell the channel order apart"
            else:  # batch statistics over all pairs: the pairs built by hand, in query-major order
                pairs = torch.stack([torch.cat([c, q]) for q in queries for c in classes])
                expected = relation.model.relation(pairs).view(len(queries), 3)
        assert (expected - expected.flip(1)).abs().max() > 1e-6, "the test case does not tell the class order apart"
        torch.testing.assert_close(outcome.logits[i, 0], expected, rtol=1e-10, atol=1e-12)
        mse = ((expected - F.one_hot(task["query_y"], 3).to(F64)) ** 2).mean()
        torch.testing.assert_close(outcome.loss[i].detach(), mse, rtol=1e-10, atol=1e-12)
        accuracy = (expected.argmax(1) == task["query_y"]).to(F64).mean()
        torch.testing.assert_close(outcome.scores[i, 0], accuracy)


def test_vmap_and_loop_meta_gradients_agree():
    grads = {}
    for path in ("loop", "vmap"):
        relation = tiny_relation_net(task_parallel=path)
        params, _ = split_state(relation.model)
        loss = run_tasks(relation.task_fn(3), params, make_batch(3, dtype=F64), None, path, second_order=False).loss.mean()
        grads[path] = torch.autograd.grad(loss, list(params.values()))
    assert any(name.startswith("relation.") for name in params)
    for a, b in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_non_transductive_relates_each_query_alone():
    relation = tiny_relation_net(transductive=False)
    batch = make_batch(1, k_shot=2, dtype=F64)
    params, _ = split_state(relation.model)
    outcome = run_tasks(relation.task_fn(3, keep_logits=True), params, batch, None, "loop", second_order=False)
    task = {k: v[0] for k, v in batch.items()}
    with torch.no_grad():
        support = relation.model(task["support_x"]).unflatten(1, (4, 4, 4))
        classes = torch.stack([support[task["support_y"] == k].sum(0) for k in range(3)])
        rows = []
        for q in task["query_x"]:
            query = relation.model(torch.cat([task["support_x"], q[None]]))[-1].unflatten(0, (4, 4, 4))
            rows.append(relation.model.relation(torch.stack([torch.cat([c, query]) for c in classes])))
    torch.testing.assert_close(outcome.logits[0, 0], torch.stack(rows), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("transductive", [True, False])
def test_separate_embedding_normalizes_the_support_set_by_itself(transductive):
    """embed=separate (Sung et al.'s two forward passes): the class maps are the support set embedded alone, the
    queries embedded as their own batch (transductive) or each alone; BatchNorm on batch statistics tells it from joint."""
    relation = tiny_relation_net(embed="separate", transductive=transductive, init="default")
    joint = tiny_relation_net(transductive=transductive, init="default")
    batch = make_batch(1, k_shot=1, k_query=2, dtype=F64)
    params, _ = split_state(relation.model)
    outcome = run_tasks(relation.task_fn(3, keep_logits=True), params, batch, None, "loop", second_order=False)
    task = {k: v[0] for k, v in batch.items()}
    with torch.no_grad():
        support = relation.model(task["support_x"]).unflatten(1, (4, 4, 4))
        classes = torch.stack([support[task["support_y"] == k].sum(0) for k in range(3)])
        if transductive:
            queries = relation.model(task["query_x"]).unflatten(1, (4, 4, 4))
        else:
            queries = torch.stack([relation.model(q[None])[0].unflatten(0, (4, 4, 4)) for q in task["query_x"]])
        pairs = [torch.stack([torch.cat([c, q]) for c in classes]) for q in queries]
        expected = relation.model.relation(torch.cat(pairs)).view(-1, 3) if transductive else torch.stack([relation.model.relation(p) for p in pairs])
    torch.testing.assert_close(outcome.logits[0, 0], expected, rtol=1e-9, atol=1e-9)
    joint_scores = run_tasks(joint.task_fn(3, keep_logits=True), params, batch, None, "loop", second_order=False).logits[0, 0]
    assert (joint_scores - expected).abs().max() > 1e-6, "the test case does not tell joint from separate embedding"
    with pytest.raises(ConfigError, match="algo.embed='both'"):
        tiny_relation_net(embed="both")


def test_trains_and_tests_without_inner_loop_metrics():
    relation = tiny_relation_net(dtype=torch.float32)
    trainer = make_trainer(max_steps=4, limit_val_batches=2, val_check_interval=4)
    trainer.fit(relation, loader(TrainStream(4, 4, n_way=3, k_shot=2, k_query=3)), loader(EvalTasks(4, 2, n_way=3, k_shot=1)))
    assert {"train/loss", "train/acc", "val/acc", "val/acc_ci95", "val/loss"} <= set(trainer.callback_metrics)
    assert not {"train/acc_before", "train/inner_lr", "val/acc_before", "val/acc_step0"} & set(trainer.callback_metrics)
    trainer.test(relation, loader(EvalTasks(5, 2, n_way=2, k_shot=2)), verbose=False)
    assert set(relation.test_results) == {"acc", "acc_ci95", "loss", "n_tasks"} and relation.test_results["n_tasks"] == 5


def test_their_feature_maps_and_a_model_without_one():
    assert Conv4Relation(1, 5, image_size=28).feature_map == (64, 5, 5)  # Omniglot
    assert Conv4Relation(3, 5, image_size=84).feature_map == (64, 19, 19)  # miniImageNet
    relation = RelationNet(Conv4Relation(3, 5, image_size=84), relation_padding=0)
    assert relation.model.relation.fc1.in_features == 64 * 3 * 3  # their miniImageNet module
    without_map = RelationNet(tiny_conv4())  # builds (every algorithm builds on every model), refuses to run
    with pytest.raises(ConfigError, match=r"algo=relationnet compares spatial feature maps, but Conv4's features end in a vector"):
        without_map.setup("fit")
    with pytest.raises(ConfigError, match="algo.relation_padding=2"):
        RelationNet(Conv4Relation(1, 5), relation_padding=2)
    with pytest.raises(ConfigError, match="algo=RelationNet learns classification tasks only"):
        RelationNet.check_task_kind(REGRESSION)


def test_a_model_without_a_map_stops_with_one_line(compose_train, capsys, caplog):
    cfg = compose_train("algo=relationnet", "model=conv4", "debug=fast_dev_run", "logger=csv")
    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(train, cfg)
    assert stopped.value.code == 2
    printed = {line for line in (capsys.readouterr().err + caplog.text).splitlines() if "Error" in line}
    assert len(printed) == 1 and "use model=conv4_relation" in printed.pop()


def test_regression_data_stops_with_one_line(compose_generated, capsys, caplog):
    cfg = compose_generated("data=sinusoid", "algo=relationnet")
    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(train, cfg)
    assert stopped.value.code == 2
    printed = {line for line in (capsys.readouterr().err + caplog.text).splitlines() if "Error" in line}
    assert len(printed) == 1 and "algo=RelationNet learns classification tasks only" in printed.pop()


@pytest.mark.parametrize("experiment", ["relationnet_omniglot_5w1s", "relationnet_omniglot_20w5s", "relationnet_miniimagenet_5w5s"])
def test_the_composed_protocols_clip_and_decay_as_theirs(compose_generated, experiment):
    """floodsung/LearningToCompare_FSL as the protocol files compose it: Adam 1e-3 halved every 100,000 episodes (StepLR), gradient norm clipped at 0.5."""
    algo = compose_generated(f"experiment={experiment}").algo
    assert algo.gradient_clip_val == 0.5 and algo.optimizer._target_ == "torch.optim.Adam" and algo.optimizer.lr == 0.001
    assert algo.scheduler._target_ == "torch.optim.lr_scheduler.StepLR" and (algo.scheduler.step_size, algo.scheduler.gamma) == (100000, 0.5)
    assert algo.init == "sung" and algo.embed == "joint" and algo.relation_running_stats is False
