"""Conditional Neural Processes (algo=cnp): the set encoder, the Gaussian NLL, learning, evaluation, the learner API, refusals.

Its DDP check (2 processes = 1) is in tests/test_regression_ddp.py; SIGKILL-then-resume on regression tasks (MAML's run) in tests/test_resume.py.
"""

from __future__ import annotations

import math


import pytest
import torch
from omegaconf import OmegaConf

from metalight.algorithms import CNP
from metalight.algorithms.model_based.cnp import gaussian_nll
from metalight.errors import ConfigError
from metalight.models import MLP, CNPNetwork
from metalight.runs import cli
from metalight.runs.training import build_data_and_algorithm, train
from metalight.tasks import REGRESSION, RegressionDataModule
from metalight.tasks.samplers import EvalTaskSampler

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data=sinusoid", "algo=cnp", "model.encoder=[32,32]", "model.decoder=[32]", "data.meta_batch_size=8", "data.batches_per_epoch=100",
         "data.n_val_tasks=16", "data.n_test_tasks=100", "data.eval_batch_size=50", "logger=csv"]


def sinusoid_batch(n_tasks: int = 3, k: int = 6, q: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """A meta-batch of sinusoid tasks drawn by hand (support then query)."""
    g = torch.Generator().manual_seed(seed)
    amplitude, phase = torch.rand(n_tasks, 1, 1, generator=g) * 4.9 + 0.1, torch.rand(n_tasks, 1, 1, generator=g) * math.pi
    x = torch.rand(n_tasks, k + q, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return {"support_x": x[:, :k], "support_y": y[:, :k], "query_x": x[:, k:], "query_y": y[:, k:]}


def test_the_representation_is_a_function_of_the_support_set_alone() -> None:
    """r is the same for any order of the support pairs; a query's prediction depends on the support set and its own x only."""
    torch.manual_seed(0)
    network = CNPNetwork(encoder=[16, 16, 8], decoder=[16]).double()
    batch = {k: v.double() for k, v in sinusoid_batch().items()}
    sx, sy, qx = batch["support_x"], batch["support_y"], batch["query_x"]
    order = torch.randperm(sx.shape[1])
    torch.testing.assert_close(network.represent(sx[:, order], sy[:, order]), network.represent(sx, sy), rtol=1e-12, atol=1e-12)
    mean, std = network(sx, sy, qx)
    permuted = network(sx[:, order], sy[:, order], qx)
    torch.testing.assert_close(permuted[0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(permuted[1], std, rtol=1e-12, atol=1e-12)
    assert bool((std >= 0.1).all())
    # each query alone gives the same prediction as with the others: the queries are not context
    alone = torch.cat([network(sx, sy, qx[:, j : j + 1])[0] for j in range(qx.shape[1])], dim=1)
    torch.testing.assert_close(alone, mean, rtol=1e-12, atol=1e-12)
    # the algorithm's predictions ignore the query targets, and follow the support targets
    algorithm = CNP(network)
    first = algorithm.evaluate_tasks(batch, "test", [0, 1, 2], keep_logits=True)
    noisy = algorithm.evaluate_tasks(batch | {"query_y": batch["query_y"] + 1.0}, "test", [0, 1, 2], keep_logits=True)
    torch.testing.assert_close(noisy.logits, first.logits, rtol=0, atol=0)
    torch.testing.assert_close(first.logits[:, 0], mean, rtol=0, atol=0)
    moved = algorithm.evaluate_tasks(batch | {"support_y": batch["support_y"] + 1.0}, "test", [0, 1, 2], keep_logits=True)
    assert not torch.allclose(moved.logits, first.logits)


def test_the_representation_is_a_mean_so_a_duplicated_support_set_predicts_the_same() -> None:
    """Garnelo et al. aggregate by the mean: each support pair twice leaves r and the predictions unchanged (a sum would double r)."""
    torch.manual_seed(0)
    network = CNPNetwork(encoder=[16, 16, 8], decoder=[16]).double()
    batch = {k: v.double() for k, v in sinusoid_batch().items()}
    sx, sy, qx = batch["support_x"], batch["support_y"], batch["query_x"]
    twice = network(torch.cat([sx, sx], dim=1), torch.cat([sy, sy], dim=1), qx)
    for doubled, once in zip(twice, network(sx, sy, qx)):
        torch.testing.assert_close(doubled, once, rtol=1e-12, atol=1e-12)
    assert network.represent(sx, sy).abs().max() > 1e-3, "the test case does not tell a mean from a sum"


def test_glorot_init_is_the_references_and_default_is_pytorchs() -> None:
    """init=glorot: Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out)), std bound / sqrt(3)) and zero biases, as tf.layers.dense."""
    torch.manual_seed(0)
    layers = [m for m in CNPNetwork().modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 7  # 4 encoder, 3 decoder layers: the reference notebook's widths
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = layer.weight.detach()
        assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.9 * bound
        if weight.numel() >= 1000:  # the 128-wide layers: the sample std within 5% of the uniform's
            assert abs(float(weight.std()) / (bound / math.sqrt(3)) - 1) < 0.05
        assert bool((layer.bias == 0).all())
    torch.manual_seed(0)
    default = [m for m in CNPNetwork(init="default").modules() if isinstance(m, torch.nn.Linear)]
    assert any(bool((m.bias != 0).any()) for m in default)  # PyTorch's biases are not zero


def test_the_nll_and_the_mse_equal_a_hand_computation() -> None:
    """A decoder set by hand (mean = x, raw std 0 -> std 0.1 + 0.9 log 2): the loss is -log N, the score the MSE of the mean."""
    network = CNPNetwork(encoder=[2], decoder=[]).double()
    with torch.no_grad():
        linear = network.decoder[0]  # inputs [r (2), x], outputs [mean, raw std]
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0, 2] = 1.0
    std = 0.1 + 0.9 * math.log(2.0)
    batch = {"support_x": torch.tensor([[[0.3], [-1.0]]]), "support_y": torch.tensor([[[2.0], [0.5]]]),
             "query_x": torch.tensor([[[1.0], [2.0]]]), "query_y": torch.tensor([[[1.5], [0.0]]])}
    batch = {k: v.double() for k, v in batch.items()}
    outcome = CNP(network).evaluate_tasks(batch, "test", [0], keep_logits=True)
    residuals = [0.5, -2.0]  # y - mean at x = 1 and 2
    nll = sum(0.5 * math.log(2 * math.pi) + math.log(std) + r**2 / (2 * std**2) for r in residuals) / 2
    assert float(outcome.loss[0]) == pytest.approx(nll, rel=1e-12)
    assert float(outcome.scores[0, 0]) == pytest.approx((0.25 + 4.0) / 2, rel=1e-12)
    assert outcome.scores.shape == (1, 1) and outcome.logits.shape == (1, 1, 2, 1)
    # over two output dimensions the NLL is summed per point, then averaged over points (the reference's diagonal Gaussian)
    mean, stds, targets = torch.zeros(1, 3, 2).double(), torch.full((1, 3, 2), 2.0).double(), torch.ones(1, 3, 2).double()
    per_dim = 0.5 * math.log(2 * math.pi) + math.log(2.0) + 1 / 8
    assert float(gaussian_nll(mean, stds, targets)[0]) == pytest.approx(2 * per_dim, rel=1e-12)


def test_support_in_targets_adds_the_support_points_to_the_training_nll_only() -> None:
    torch.manual_seed(0)
    batch = {k: v.double() for k, v in sinusoid_batch().items()}
    plain, both = (CNP(CNPNetwork(encoder=[8], decoder=[8]).double(), support_in_targets=flag) for flag in (False, True))
    both.model.load_state_dict(plain.model.state_dict())
    mean, std = plain.model(batch["support_x"], batch["support_y"], torch.cat([batch["support_x"], batch["query_x"]], 1))
    expected = gaussian_nll(mean, std, torch.cat([batch["support_y"], batch["query_y"]], 1))
    torch.testing.assert_close(both.outcome(batch, training=True).loss, expected)
    torch.testing.assert_close(both.evaluate_tasks(batch, "val", [0, 1, 2]).loss, plain.evaluate_tasks(batch, "val", [0, 1, 2]).loss)
    torch.testing.assert_close(both.outcome(batch, training=True).scores, plain.outcome(batch, training=True).scores)


def test_cnp_learns_sinusoids_beating_its_untrained_self(compose_generated, tmp_path) -> None:
    """A few seconds of training on sinusoids lowers the test MSE of the predicted mean, on the same test tasks; eval.py and the learner agree."""
    from metalight import FewShotLearner
    from metalight.apply.evaluation import evaluate

    cfg = compose_generated(*SMALL, "trainer.max_steps=400", "algo.optimizer.lr=0.001")
    datamodule, untrained = build_data_and_algorithm(cfg)
    keys = next(iter(EvalTaskSampler(cfg.data.n_test_tasks, cfg.data.n_test_tasks)))
    test_tasks = datamodule.tasks("test")[keys]
    before = float(untrained.evaluate_tasks(test_tasks, "test", list(range(len(keys)))).scores.mean())
    metrics, objects = train(cfg)
    assert objects["algorithm"].task_kind is REGRESSION and objects["trainer"].global_step == 400
    after = metrics["test/mse"]
    assert after < 0.6 * before, (after, before)
    assert "test/mse_step0" not in metrics and "test/acc" not in metrics and math.isfinite(metrics["test/loss"])

    run = tmp_path / "run"  # as train.py leaves it: the composed config beside the checkpoints
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    best = objects["trainer"].checkpoint_callback.best_model_path
    eval_cfg = compose_generated(f"ckpt_path={best}", "logger=csv", config_name="eval", folder="eval")
    results = evaluate(eval_cfg)
    assert results["mse"] == pytest.approx(after, rel=1e-6) and results["n_tasks"] == 100

    learner = FewShotLearner.load(best)
    x = torch.linspace(-4, 4, 10)
    query = torch.tensor([[1.0], [-2.5], [3.0]])
    predicted = learner.adapt(x, 2.0 * torch.sin(x)).predict(query)
    mean, _ = learner.algorithm.model(x[None, :, None], 2.0 * torch.sin(x)[None, :, None], query[None])
    assert predicted.shape == (3, 1)
    torch.testing.assert_close(predicted, mean[0])


@pytest.mark.parametrize("data", ["omniglot", "miniimagenet"])
def test_classification_data_stops_with_one_line_writing_nothing(compose_generated, tmp_path, caplog, data) -> None:
    cfg = compose_generated(f"data={data}", "algo=cnp")
    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(train, cfg)
    assert stopped.value.code == 2
    printed = [line for record in caplog.records if record.levelname == "ERROR" for line in record.getMessage().splitlines()]
    assert len(printed) == 1 and "algo=CNP learns regression tasks only" in printed[0] and "gives classification tasks" in printed[0]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.loss=huber"], "algo=cnp minimizes the Gaussian negative log-likelihood"),
        (["model=mlp"], "algo=cnp needs its network, model=cnp"),
        (["model.min_std=1.5"], "model.min_std=1.5 is not valid"),
        (["model.encoder=[]"], "model.encoder must not be empty"),
    ],
)
def test_what_a_cnp_cannot_take_names_the_key(compose_generated, overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        build_data_and_algorithm(compose_generated("data=sinusoid", "algo=cnp", *overrides))


def test_algo_cnp_picks_its_network_and_its_experiments_compose(compose_generated) -> None:
    for overrides in (["data=sinusoid", "algo=cnp"], ["algo=cnp", "data=harmonic"], ["experiment=quick_sinusoid_cnp"], ["experiment=cnp_sinusoid"]):
        cfg = compose_generated(*overrides)
        assert cfg.model._target_ == "metalight.models.CNPNetwork" and cfg.algo._target_ == "metalight.algorithms.CNP", overrides
        _, algorithm = build_data_and_algorithm(cfg)
        assert isinstance(algorithm, CNP) and cfg.callbacks.model_checkpoint.monitor == "val/mse"
    quick, maml = compose_generated("experiment=quick_sinusoid_cnp"), compose_generated("experiment=quick_sinusoid")
    for key in ("family", "family_options", "k_shot", "k_query", "n_test_tasks", "eval_seed", "x_range", "noise_std"):
        assert quick.data[key] == maml.data[key], f"the quick runs' test tasks differ in data.{key}"
    assert isinstance(CNP(CNPNetwork()).model, CNPNetwork)
    with pytest.raises(ConfigError, match="algo=cnp needs its network, model=cnp"):
        CNP(MLP())  # another network (the gradient-based learners' MLP) is refused, not trained as a CNP


def test_the_fits_figure_shows_one_prediction() -> None:
    """TensorBoard's val_regression/fits for a learner without steps: its predicted mean, labelled as such, not "before adaptation"."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from metalight.visualization import adapted_fits, plot_fits

    datamodule = RegressionDataModule("metalight.tasks.families.sinusoid", k_shot=5, k_query=5, n_val_tasks=2)
    grid = np.linspace(-5, 5, 7)[:, None]
    fits = adapted_fits(CNP(CNPNetwork(encoder=[8], decoder=[8])), datamodule.tasks("val"), [0, 1], grid)
    assert fits["predictions"].shape == (2, 1, 7, 1)
    figure = plot_fits(fits, grid)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["ground truth", "prediction"]
