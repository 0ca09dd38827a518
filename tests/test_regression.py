"""Few-shot regression through the task interface: the families and their data module, the MSE meta-gradient,
every gradient-based learner on data=sinusoid, the learner API, the figures, and bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metalight.algorithms.optimization.functional import InnerLoop, make_task_fn, run_tasks, split_state
from metalight.errors import ConfigError
from metalight.models import MLP
from algo_tasks import assert_stops_with_one_line
from metalight.runs.training import train
from metalight.tasks import REGRESSION, RegressionDataModule
from metalight.tasks.kinds import CLASSIFICATION
from metalight.tasks.samplers import EvalTaskSampler, TrainTaskSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tasks: extra threads only wait on each other

SINUSOID = "metalight.tasks.families.sinusoid"


def slope_family(rng: np.random.Generator, scale: float = 1.0):
    """A user's own family, named by its dotted path (test_regression.slope_family): y = s x, s ~ U[-scale, scale]."""
    slope = rng.uniform(-scale, scale)
    return lambda x: slope * x


def vector_family(rng: np.random.Generator):
    """A family with the wrong output shape for data.output_dim=1: two targets per input."""
    return lambda x: np.concatenate([x, x], axis=1)


def module(**options) -> RegressionDataModule:
    """A small sinusoid data module, set up."""
    datamodule = RegressionDataModule(**({"family": SINUSOID, "k_shot": 5, "k_query": 7, "meta_batch_size": 4, "seed": 3} | options))
    datamodule.setup()
    return datamodule


def test_sinusoid_tasks_are_finn_et_als(compose_generated) -> None:
    """The tasks conf/data/sinusoid.yaml composes (in the protocol sinusoid_finn): A sin(x - b) with A in [0.1, 5], b in [0, pi], x in [-5, 5]; support then query points."""
    cfg = compose_generated("experiment=sinusoid_finn", "data.k_shot=5", "data.k_query=7")
    datamodule = instantiate(cfg.data, _recursive_=False)
    datamodule.setup()
    batch = datamodule._datasets["train"][[(0, i) for i in range(40)]]
    assert batch["support_x"].shape == (40, 5, 1) and batch["query_y"].shape == (40, 7, 1)
    x = torch.cat([batch["support_x"], batch["query_x"]], 1).double()[..., 0]
    y = torch.cat([batch["support_y"], batch["query_y"]], 1).double()[..., 0]
    assert x.min() >= -5 and x.max() <= 5
    # y = A cos(b) sin(x) - A sin(b) cos(x): recover A and b by least squares, exactly
    basis = torch.stack([torch.sin(x), -torch.cos(x)], dim=-1)
    c = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution[..., 0]
    amplitude, phase = c.norm(dim=-1), torch.atan2(c[:, 1], c[:, 0])
    torch.testing.assert_close(torch.einsum("bnk,bk->bn", basis, c), y, atol=1e-5, rtol=0)
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4 and amplitude.std() > 0.5
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4


@pytest.mark.parametrize("experiment", ["sinusoid_finn", "maml_sinusoid", "pretrained_sinusoid", "quick_sinusoid"])
def test_the_composed_protocol_is_finn_et_als(compose_generated, experiment) -> None:
    """Finn et al. 2017 §5.1 / cbfinn/maml as the protocol files compose it, not as Python defaults: a typo in conf/ fails here."""
    cfg = compose_generated(f"experiment={experiment}")
    data, model, algo = cfg.data, cfg.model, cfg.algo
    assert data.family == SINUSOID and list(data.family_options.amplitude) == [0.1, 5.0] and list(data.x_range) == [-5.0, 5.0]
    assert list(data.family_options.phase) == pytest.approx([0.0, math.pi]) and data.noise_std == 0.0
    assert (data.k_shot, data.k_query, data.meta_batch_size, data.n_test_tasks) == (10, 10, 25, 600)
    assert model._target_ == "metalight.models.MLP" and list(model.hidden) == [40, 40] and model.activation == "relu" and model.init == "finn"
    assert (algo.inner_lr, algo.eval_inner_steps, algo.optimizer.lr) == (0.01, 10, 0.001) and algo.optimizer._target_ == "torch.optim.Adam"
    assert algo.inner_steps == (0 if experiment == "pretrained_sinusoid" else 1)
    assert cfg.trainer.max_steps == (6000 if experiment == "quick_sinusoid" else 70000)


def test_tasks_are_a_function_of_seed_epoch_and_index_and_ranks_share_them() -> None:
    train_tasks = module()._datasets["train"]
    again = module()._datasets["train"]
    keys = [(1, 5), (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(train_tasks[keys].values(), again[keys].values()))
    assert not torch.equal(train_tasks[[(0, 0)]]["support_y"], module(seed=4)._datasets["train"][[(0, 0)]]["support_y"])
    one = [train_tasks[k]["support_y"] for k in TrainTaskSampler(4, 3)]
    two = [[train_tasks[k]["support_y"] for k in TrainTaskSampler(4, 3, rank, 2)] for rank in (0, 1)]
    for step, batch in enumerate(one):
        assert torch.equal(batch, torch.cat([two[0][step], two[1][step]]))


def test_val_and_test_tasks_are_fixed_by_eval_seed() -> None:
    a, b, c = module(seed=1), module(seed=2), module(eval_seed=1)
    keys = next(iter(EvalTaskSampler(6, 6)))
    assert torch.equal(a._datasets["val"][keys]["query_y"], b._datasets["val"][keys]["query_y"])
    assert not torch.equal(a._datasets["val"][keys]["query_y"], a._datasets["test"][keys]["query_y"])
    assert not torch.equal(a._datasets["val"][keys]["query_y"], c._datasets["val"][keys]["query_y"])


def test_the_other_families_and_your_own() -> None:
    lines = module(family="metalight.tasks.families.sine_and_line", k_shot=10, k_query=0 + 1)._datasets["train"][[(0, i) for i in range(60)]]
    x, y = lines["support_x"][..., 0].double(), lines["support_y"][..., 0].double()
    design = torch.stack([x, torch.ones_like(x)], -1)
    residual = (torch.einsum("bnk,bk->bn", design, torch.linalg.lstsq(design, y.unsqueeze(-1)).solution[..., 0]) - y).abs().amax(1)
    straight = residual < 1e-4
    assert 10 < int(straight.sum()) < 50, "half lines, half sinusoids"
    harmonic = module(family="metalight.tasks.families.harmonic")._datasets["train"][[(0, i) for i in range(50)]]
    spread = harmonic["support_x"].amax(1) - harmonic["support_x"].amin(1)
    assert spread.max() < 8  # inputs around a task's own mean, not uniform over x_range
    centres, within = harmonic["support_x"].double().mean(1), harmonic["support_x"].double().std(1)
    assert centres.abs().max() < 4 + 1.5 and centres.std() > 1.5  # mu ~ U[-4, 4] per task (std 2.3)
    assert 0.7 < float(within.mean()) < 1.3  # N(mu, 1) around it
    own = module(family="test_regression.slope_family", family_options={"scale": 2.0})._datasets["train"][[(0, 0), (0, 1)]]
    ratio = own["query_y"] / own["query_x"]
    assert torch.allclose(ratio, ratio[:, :1], atol=1e-5) and ratio.abs().max() <= 2.0


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"family_options": {"amplitude": [5.0, 0.1]}}, "data.family_options.amplitude=[5.0, 0.1] is empty or inverted"),
        ({"family_options": {"phase": [1.0, 1.0]}}, "data.family_options.phase=[1.0, 1.0] is empty or inverted"),
        ({"x_range": [2.0, -2.0]}, "data.x_range=[2.0, -2.0] is empty or inverted"),
        ({"k_shot": 0}, "data.k_shot=0 is not valid"),
        ({"family": "no_such_package.tasks"}, "data.family='no_such_package.tasks' cannot be imported"),
        ({"family": "test_regression.vector_family"}, "not [5, data.output_dim=1]"),
        ({"family_options": {"frequency": [1, 2]}}, "check data.family_options"),
        ({"loss": "hinge"}, "data.loss='hinge' is not a dotted path (package.module.function): give one of mse, l1, huber"),
        ({"loss": "no_such_package.loss"}, "data.loss='no_such_package.loss' cannot be imported"),
    ],
)
def test_bad_regression_input_names_the_key(options, expected) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        module(**options)


def test_second_order_mse_meta_gradient_matches_finite_differences() -> None:
    """d/dtheta of the query MSE after two inner SGD steps on the support MSE: autograd (vmap and loop) vs central differences."""
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=[5, 4], init="default").double()
    params, fixed = split_state(model)
    batch = {k: v.double() for k, v in module(k_shot=4, k_query=3)._datasets["train"][[(0, 0), (0, 1)]].items()}
    loop = InnerLoop(steps=2, lr=0.05, first_order=False)

    def meta_loss(weights: dict[str, torch.Tensor], path: str) -> torch.Tensor:
        task_fn = make_task_fn(model, fixed, loop, path, record="last", kind=REGRESSION)
        return run_tasks(task_fn, weights, batch, None, path, second_order=True).loss.mean()

    grads = {path: torch.autograd.grad(meta_loss(params, path), list(params.values())) for path in ("vmap", "loop")}
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    eps = 1e-6
    for (name, p), g in zip(params.items(), grads["loop"]):
        for index in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            shifted = []
            for sign in (1, -1):
                moved = p.detach().clone()
                moved[index] += sign * eps
                shifted.append({**params, name: moved.requires_grad_()})
            numeric = (meta_loss(shifted[0], "loop") - meta_loss(shifted[1], "loop")) / (2 * eps)
            assert float(g[index]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9), f"{name}{list(index)}"
    # the loss really is the MSE: one task's query loss, recomputed by hand before adaptation
    zero = InnerLoop(steps=0, lr=0.05)
    outcome = run_tasks(make_task_fn(model, fixed, zero, "loop", record="last", kind=REGRESSION), params, batch, None, "loop", second_order=False)
    by_hand = ((model(batch["query_x"][0]) - batch["query_y"][0]) ** 2).mean()
    torch.testing.assert_close(outcome.loss[0], by_hand)
    torch.testing.assert_close(outcome.scores[0, -1], by_hand.detach())


GRADIENT_BASED = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "pretrained"]
SMALL = ["data=sinusoid", "model.hidden=[16,16]", "trainer.max_steps=10", "data.batches_per_epoch=5", "data.meta_batch_size=4",
         "data.n_val_tasks=4", "data.n_test_tasks=4", "data.eval_batch_size=4", "algo.eval_inner_steps=3", "logger=csv"]


@pytest.mark.parametrize("path", ["vmap", "loop"])
@pytest.mark.parametrize("algo", GRADIENT_BASED)
def test_every_gradient_based_learner_trains_on_sinusoids(compose_generated, algo, path) -> None:
    extra = {"mamlpp": ["algo.msl_epochs=1", "algo.bnrs=false", "algo.bnwb=false"],  # an MLP has no BatchNorm to give per-step weights
             "reptile": ["algo.eval_inner_batch_size=null"]}.get(algo, [])
    cfg = compose_generated(*SMALL, f"algo={algo}", "algo.inner_lr=0.01", f"algo.task_parallel={path}", *extra)
    metrics, objects = train(cfg)
    assert objects["algorithm"].task_kind is REGRESSION and objects["trainer"].global_step == 10
    assert objects["algorithm"].path() == path
    steps = [metrics[f"test/mse_step{k}"] for k in range(4)]
    assert all(math.isfinite(v) and v > 0 for v in steps) and metrics["test/mse"] == steps[-1]
    assert "test/acc" not in metrics and math.isfinite(metrics["val/mse_best"])
    best = objects["trainer"].checkpoint_callback.best_model_path
    assert "-mse" in best, "the best checkpoint is chosen (and named) by val/mse"


def test_maml_learns_sinusoids_and_beats_the_pretrained_baseline(compose_generated) -> None:
    """2,000 steps of quick_sinusoid: after 10 steps MAML's test MSE is below the jointly trained net's, same tasks."""
    scores = {}
    for algo in ("maml", "pretrained"):
        cfg = compose_generated("experiment=quick_sinusoid", f"algo={algo}", *(["algo.inner_steps=0"] if algo == "pretrained" else []),
                                "trainer.max_steps=2000", "data.batches_per_epoch=1000", "data.n_val_tasks=20", "data.n_test_tasks=100", "logger=csv",
                                folder=algo)
        metrics, _ = train(cfg)
        scores[algo] = metrics
    maml, pretrained = scores["maml"], scores["pretrained"]
    assert maml["test/mse_step10"] < 0.5 * pretrained["test/mse_step10"], (maml["test/mse_step10"], pretrained["test/mse_step10"])
    assert maml["test/mse_step10"] < 0.5 * maml["test/mse_step0"], "adaptation helps"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algo=protonet"], "learns classification tasks only, but the data (data=...) gives regression tasks"),
        (["algo=baseline"], "learns classification tasks only, but the data (data=...) gives regression tasks"),
        (["data.family=no_such_package.tasks"], "data.family='no_such_package.tasks' cannot be imported"),
        (["data=regression", "data.family=test_regression.vector_family"], "not [5, data.output_dim=1]"),
        (["data.family_options.amplitude=[5.0,0.1]"], "data.family_options.amplitude=[5.0, 0.1] is empty or inverted"),
        (["data.x_range=[1.0,1.0]"], "data.x_range=[1.0, 1.0] is empty or inverted"),
        (["data.k_shot=0"], "data.k_shot=0 is not valid"),
    ],
)
def test_bad_input_is_one_line_status_2_and_nothing_written(compose_generated, tmp_path, caplog, overrides, expected) -> None:
    """Through the entry point train.py wraps (cli.run_reporting_errors): one logged line, exit status 2, no run folder content."""
    data = [] if any(item.startswith("data=") for item in overrides) else ["data=sinusoid"]
    cfg = compose_generated(*data, "algo=maml", *overrides)
    assert_stops_with_one_line(cfg, caplog, tmp_path / "run", expected)


def test_eval_py_reproduces_a_regression_runs_test_mse(compose_generated, tmp_path) -> None:
    from metalight.apply.evaluation import evaluate

    cfg = compose_generated(*SMALL, "algo=maml", "algo.inner_lr=0.01")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, tmp_path / "run" / ".hydra" / "config.yaml")
    metrics, objects = train(cfg)
    best = objects["trainer"].checkpoint_callback.best_model_path
    eval_cfg = compose_generated(f"ckpt_path={best}", config_name="eval", folder="eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("metalight.apply.evaluation._overrides", lambda: [])
        results = evaluate(eval_cfg)
    assert results["mse"] == pytest.approx(metrics["test/mse"], rel=1e-6) and "acc" not in results
    assert len(results["mse_steps"]) == cfg.algo.eval_inner_steps + 1 and results["n_tasks"] == cfg.data.n_test_tasks


def test_a_custom_family_in_one_line_and_its_learner_api(compose_generated, tmp_path) -> None:
    """data=regression data.family=<your function>: train, then FewShotLearner.adapt(x, y).predict(x) on tensors, as evaluation scores."""
    from metalight import FewShotLearner

    cfg = compose_generated("data=regression", "data.family=test_regression.slope_family", "+data.family_options.scale=3.0", "algo=maml",
                            "algo.inner_lr=0.01", "algo.eval_inner_steps=5", *SMALL[1:])
    _, objects = train(cfg)
    run = tmp_path / "run"  # as train.py leaves it: Hydra writes the composed config beside the checkpoints
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    learner = FewShotLearner.load(run)
    x = torch.linspace(-4, 4, 6)
    predicted = learner.adapt(x, 2.0 * x).predict(torch.tensor([[1.0], [2.0]]))
    assert predicted.shape == (2, 1)
    algorithm = learner.algorithm
    batch = {"support_x": x[None, :, None], "support_y": 2.0 * x[None, :, None], "query_x": torch.tensor([[[1.0], [2.0]]]), "query_y": torch.zeros(1, 2, 1)}
    expected = algorithm.evaluate_tasks(batch, "test", [0], keep_logits=True).logits[0, -1]
    torch.testing.assert_close(predicted, expected)
    with pytest.raises(ConfigError, match="data.input_dim=1"):
        learner.adapt(torch.zeros(3, 2), torch.zeros(3))
    from metalight.apply.prediction import predict

    request = OmegaConf.create({"ckpt_path": str(run), "device": "cpu", "paths": {"log_dir": str(tmp_path)}, "support": "any", "query": "any"})
    with pytest.raises(ConfigError, match="predict.py classifies images or texts, but .* learned regression tasks"):
        predict(request)


def test_regression_fits_are_logged_to_tensorboard(compose_generated, tmp_path) -> None:
    from metalight.visualization import read_scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_generated(*SMALL[:-1], "algo=maml", "algo.inner_lr=0.01", "test=false", "algo.eval_inner_steps=10")
    train(cfg)
    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert {"val_regression/fits", "val_regression/mse_per_step"} <= set(events.Tags()["images"])
    scalars = read_scalars(tmp_path / "run")
    assert {f"val/mse_step{k}" for k in range(11)} <= set(scalars) and "val/acc" not in scalars


def test_an_image_learner_keeps_classification() -> None:
    """Without a data module saying otherwise a learner is a classifier: the image path is what it was."""
    from metalight.algorithms import MAML

    assert MAML(MLP()).task_kind is CLASSIFICATION and CLASSIFICATION.metric == "acc"


def test_your_own_family_must_be_named(compose_generated) -> None:
    from metalight.runs.config import validate_config

    with pytest.raises(ConfigError, match=re.escape("data.family is not set: give data.family=<package.module.function>")):
        validate_config(compose_generated("data=regression"))


def test_regression_configs_compose_with_every_gradient_based_learner(compose_generated) -> None:
    for data in ("sinusoid", "harmonic", "sine_and_line"):
        for algo in GRADIENT_BASED:
            cfg = compose_generated(f"data={data}", f"algo={algo}", *(["algo.bnrs=false", "algo.bnwb=false"] if algo == "mamlpp" else []))
            datamodule = instantiate(cfg.data)
            algorithm = instantiate(cfg.algo, model=instantiate(cfg.model))
            algorithm.use_task_kind(datamodule.kind)
            assert cfg.callbacks.model_checkpoint.monitor == "val/mse" and cfg.callbacks.model_checkpoint.mode == "min"
