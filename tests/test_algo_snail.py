"""SNAIL: causal TC and attention blocks, the shared-prefix query batch against each query's sequence alone,
the per-task support order, bad input, and a short Omniglot run with its attention picture in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from algo_tasks import make_batch, tiny_conv4
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from metalight.algorithms import SNAIL
from metalight.algorithms.optimization.functional import run_tasks, split_state
from metalight.errors import ConfigError
from metalight.models.snail import SNAILNet, tc_dilations
from metalight.runs.training import train
from metalight.visualization import attention_grid
from metalight.visualization.images import SUPPORT

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
BLOCKS = [["attention", 6, 4], ["tc", 5], ["attention", 6, 5], ["tc", 5], ["attention", 8, 4]]


def tiny_net(n_way: int = 3, length: int = 7, seed: int = 0) -> SNAILNet:
    torch.manual_seed(seed)
    return SNAILNet(10, n_way, length, BLOCKS, embedding=5).to(F64)


def test_tc_dilations_are_the_papers():
    assert tc_dilations(6) == [2, 4, 8]  # 5-way 1-shot: T = 6, ceil(log2 6) = 3 levels
    assert tc_dilations(26) == [2, 4, 8, 16, 32]  # 5-way 5-shot
    assert tc_dilations(21) == [2, 4, 8, 16, 32]  # 20-way 1-shot


def test_position_t_does_not_read_later_positions():
    net = tiny_net(length=8)
    features, labels = torch.randn(2, 8, 10, dtype=F64), torch.randint(0, 3, (2, 8))
    before = net(features, labels)
    for t in range(7):
        changed_features, changed_labels = features.clone(), labels.clone()
        changed_features[:, t + 1 :] = torch.randn_like(changed_features[:, t + 1 :])
        changed_labels[:, t + 1 :] = (labels[:, t + 1 :] + 1) % 3
        after = net(changed_features, changed_labels)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])  # the change does reach later positions


def test_every_earlier_position_reaches_the_last_one():
    # attention reads every earlier position; a network of TC blocks alone would not (dilations 2, 4, ... skip odd lags)
    net = tiny_net(length=8)
    features, labels = torch.randn(1, 8, 10, dtype=F64), torch.randint(0, 3, (1, 8))
    for t in range(7):
        changed = features.clone()
        changed[:, t] += 1.0
        assert not torch.allclose(net(changed, labels)[:, -1], net(features, labels)[:, -1])


def test_queries_sharing_the_prefix_equal_each_query_sequence_alone():
    net = tiny_net(length=7)
    prefix, labels, queries = torch.randn(6, 10, dtype=F64), torch.randint(0, 3, (6,)), torch.randn(4, 10, dtype=F64)
    batched, weights = net(prefix, labels, queries, attention=True)
    sequences = torch.cat([prefix.expand(4, -1, -1), queries.unsqueeze(1)], dim=1)
    alone = net(sequences, torch.cat([labels.expand(4, -1), torch.full((4, 1), -1)], dim=1))[:, -1]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-12)
    # the attention picture's weights are the last block's row of the whole sequence's attention
    last = net.layers[-1]
    x = net.inputs(sequences, torch.cat([labels.expand(4, -1), torch.full((4, 1), -1)], dim=1))
    for layer in net.layers[:-1]:
        x = layer(x)
    torch.testing.assert_close(weights, last.weights(x)[:, -1], rtol=0, atol=1e-12)


def test_a_shorter_prefix_also_matches():
    # 1-shot support sets shorter than the network's length (dilations reaching before the start read zeros)
    net = tiny_net(length=16)
    prefix, labels, queries = torch.randn(3, 10, dtype=F64), torch.randint(0, 3, (3,)), torch.randn(2, 10, dtype=F64)
    sequences = torch.cat([prefix.expand(2, -1, -1), queries.unsqueeze(1)], dim=1)
    alone = net(sequences, torch.cat([labels.expand(2, -1), torch.full((2, 1), -1)], dim=1))[:, -1]
    torch.testing.assert_close(net(prefix, labels, queries), alone, rtol=0, atol=1e-12)


def snail(running_stats: bool = False, **options) -> SNAIL:
    model = tiny_conv4(n_way=3, dtype=F64, track_running_stats=running_stats)
    return SNAIL(model, n_way=3, k_shot=2, blocks=BLOCKS, embedding=5, **options)


@pytest.mark.parametrize("transductive", [True, False])
def test_the_learner_scores_each_query_as_its_own_sequence(transductive):
    # running BatchNorm statistics in eval mode (the snail_* protocols): each image is embedded alone
    algorithm = snail(running_stats=True, transductive=transductive, task_parallel="loop").eval()
    batch = make_batch(2, n_way=3, k_shot=2, k_query=2, size=8, dtype=F64)
    params, _ = split_state(algorithm.model)
    outcome = run_tasks(algorithm.task_fn(3, keep_logits=True), params, batch, None, "loop", second_order=False)
    model = algorithm.model
    for task in range(2):
        sx, sy = batch["support_x"][task], batch["support_y"][task]
        for q, (qx, qy) in enumerate(zip(batch["query_x"][task], batch["query_y"][task])):
            embedded = model(torch.cat([sx, qx.unsqueeze(0)]))
            logits = model.snail(embedded.unsqueeze(0), torch.cat([sy, torch.tensor([-1])]).unsqueeze(0))[0, -1]
            torch.testing.assert_close(outcome.logits[task, 0, q], logits, rtol=0, atol=1e-10)


def test_vmap_equals_loop():
    batch = make_batch(3, n_way=3, k_shot=2, k_query=2, size=8, dtype=F64)
    outcomes = {}
    for path in ("loop", "vmap"):
        algorithm = snail(task_parallel=path)
        params, _ = split_state(algorithm.model)
        outcomes[path] = run_tasks(algorithm.task_fn(3, keep_logits=True), params, batch, None, path, second_order=False)
    torch.testing.assert_close(outcomes["vmap"].logits, outcomes["loop"].logits, rtol=0, atol=1e-10)


def test_support_order_is_a_function_of_the_task():
    algorithm = snail()
    batch = make_batch(3, n_way=3, k_shot=2, k_query=1, size=8)
    ordered = algorithm.ordered(batch, "val", 0, [0, 1, 2])
    again = algorithm.ordered({k: v[1:] for k, v in batch.items()}, "val", 0, [1, 2])  # task 1 in another batch
    assert torch.equal(ordered["support_y"][1:], again["support_y"])
    assert not torch.equal(ordered["support_y"], batch["support_y"])  # shuffled, not class-major
    assert not torch.equal(algorithm.ordered(batch, "val", 0, [3, 4, 5])["support_y"], ordered["support_y"])
    assert torch.equal(snail(shuffle_support=False).ordered(batch, "val", 0, [0, 1, 2])["support_y"], batch["support_y"])
    for task in range(3):  # the images travel with their labels
        for image, label in zip(ordered["support_x"][task], ordered["support_y"][task]):
            assert any(torch.equal(image, x) and int(label) == int(y) for x, y in zip(batch["support_x"][task], batch["support_y"][task]))


def test_attention_weights_are_in_the_tasks_support_order():
    algorithm = snail(running_stats=True).eval()
    task = {k: v[0] for k, v in make_batch(1, n_way=3, k_shot=2, k_query=2, size=8, dtype=F64).items()}
    weights = algorithm.support_attention(task, "val", 0)
    order = algorithm.support_order(6, "val", 0, 0)
    with torch.no_grad():
        support = algorithm.model(task["support_x"][order])
        _, shuffled = algorithm.model.snail(support, task["support_y"][order], algorithm.model(task["query_x"]), attention=True)
    torch.testing.assert_close(weights[:, order], shuffled[:, :-1], rtol=0, atol=1e-10)


def test_attention_grid_shades_each_cell_by_its_weight():
    task = {k: v[0] for k, v in make_batch(1, n_way=3, k_shot=1, k_query=1, size=28).items()}
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    grid = attention_grid(task, weights, [0.5], [0.25])
    width, tile = 2, 28 + 4 * 2 + 2
    assert grid.shape == (3, 4 * tile + width, 4 * tile + width)  # a support row over 3 query rows; a query column beside 3 support columns

    def cell(query: int, support: int) -> tuple[float, ...]:
        """Color at the centre of the cell of (query row, support column)."""
        return tuple(round(float(v), 3) for v in grid[:, width + (query + 1) * tile + tile // 2, width + (support + 1) * tile + tile // 2])

    dark = tuple(0.5 * c for c in SUPPORT)
    assert cell(0, 0) == pytest.approx(dark, abs=1e-3) and cell(0, 1) == pytest.approx((1.0, 1.0, 1.0), abs=1e-3)
    assert cell(1, 2) == pytest.approx(tuple((1.0 + d) / 2 for d in dark), abs=1e-3)


def test_longer_sequences_than_built_for_are_refused():
    algorithm = snail()
    batch = make_batch(1, n_way=3, k_shot=3, k_query=1, size=8, dtype=F64)  # 10 > 3 * 2 + 1
    with pytest.raises(ConfigError, match=r"sequences of 7 = data.n_way \* data.k_shot \+ 1 examples, but got 10"):
        algorithm.evaluate_tasks(batch, "val", [0])
    with pytest.raises(ConfigError, match="scores 3 classes"):
        algorithm.check_shape(4, 4)


def test_a_model_without_features_is_refused():
    with pytest.raises(ConfigError, match="SNAIL needs a model with a separable head"):
        SNAIL(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), n_way=3, k_shot=1)
    with pytest.raises(ConfigError, match="algo.blocks entry"):
        SNAIL(tiny_conv4(), n_way=3, k_shot=1, blocks=[["lstm", 4]])


@pytest.mark.parametrize(("override", "message"), [("data.k_shot_train=5", "SNAIL was built for sequences of 6"), ("data.n_way_train=10", "SNAIL scores 5 classes")])
def test_training_tasks_of_another_shape_stop_the_run(compose_train, override, message):
    cfg = compose_train("algo=snail", override, "debug=fast_dev_run", "logger=csv")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_omniglot_run_logs_the_attention_picture(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(
        "algo=snail", "model.hidden=8", "trainer.max_steps=2", "data.batches_per_epoch=1", "data.meta_batch_size=2",
        "data.n_val_tasks=2", "data.eval_batch_size=2", "data.n_test_tasks=2", "data.k_query=2",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and 0.0 <= metrics["test/acc"] <= 1.0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Images("val_task/attention")
    assert len(images) == 2
    # a corner + 5 support tiles across, a support row + 10 query rows down; tiles 28 + 4 * 2 + 2
    tile = 28 + 4 * 2 + 2
    assert (images[-1].width, images[-1].height) == (6 * tile + 2, 11 * tile + 2)
    assert "val_task/attention_legend/text_summary" in events.Tags()["tensors"]
