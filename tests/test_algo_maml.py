"""MAML as a LightningModule: the outer step, clipping, non-finite steps, evaluation metrics, checkpoints."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4
from test_algo_functional import reference_maml_gradient

from metalight.algorithms import MAML, NonFiniteMetaStepError
from metalight.algorithms.optimization.functional import InnerLoop, make_task_fn, run_tasks, split_state
from metalight.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SGD1 = functools.partial(torch.optim.SGD, lr=1.0)


def test_meta_step_applies_the_exact_meta_gradient():
    model = tiny_conv4(dtype=F64)
    theta = copy.deepcopy(model)
    maml = MAML(model, inner_lr=0.3, inner_steps=2, optimizer=SGD1)
    make_trainer(max_steps=1, precision="64-true").fit(maml, loader(TrainStream(1, 3, dtype=F64)))
    expected = reference_maml_gradient(theta, make_batch(3, seed=0, dtype=F64), lr=0.3, steps=2, first_order=False)
    for p_new, p_old, g in zip(model.parameters(), theta.parameters(), expected):
        torch.testing.assert_close(p_new.detach(), p_old.detach() - g, rtol=1e-9, atol=1e-11)


def test_training_and_evaluation_log_every_metric():
    model = tiny_conv4()
    maml = MAML(
        model, inner_lr=0.4, inner_steps=1, eval_inner_steps=3, optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = make_trainer(max_steps=3, limit_val_batches=2, val_check_interval=3)
    trainer.fit(maml, loader(TrainStream(3, 4)), loader(EvalTasks(6, 3)))
    logged = set(trainer.callback_metrics)
    train = {"train/loss", "train/acc", "train/acc_before", "train/grad_norm", "train/inner_lr", "train/outer_lr", "train/tasks_per_s"}
    val = {"val/acc", "val/acc_ci95", "val/acc_before", "val/loss"} | {f"val/acc_step{k}" for k in range(4)}
    assert train | val <= logged
    assert trainer.callback_metrics["train/outer_lr"] == pytest.approx(1e-3 * 0.5**2)  # logged before the 3rd step's decay
    assert maml.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)

    trainer.test(maml, loader(EvalTasks(5, 2)), verbose=False)
    results = maml.test_results
    assert results["n_tasks"] == 5 and len(results["acc_steps"]) == 4
    assert results["acc_before"] == results["acc_steps"][0] and results["acc"] == pytest.approx(results["acc_steps"][-1])
    assert {"test/acc", "test/acc_ci95", "test/acc_step3"} | {f"test/acc_step{k}_ci95" for k in range(4)} <= set(trainer.callback_metrics)


def test_evaluation_aggregates_over_tasks_not_batches():
    model = tiny_conv4()
    maml = MAML(model, eval_inner_steps=2, eval_inner_lr=0.5)
    make_trainer().test(maml, loader(EvalTasks(5, 3)), verbose=False)  # batches of 3 and 2 tasks

    params, fixed = split_state(model)
    tasks = make_batch(5, seed=1000)
    outcome = run_tasks(
        make_task_fn(model.eval(), fixed, InnerLoop(steps=2, lr=0.5), "loop", record="every_step"),
        {k: v.detach() for k, v in params.items()}, tasks, None, "loop", second_order=False,
    )
    accs = outcome.scores[:, -1].double()
    assert maml.test_results["acc"] == pytest.approx(accs.mean().item())
    assert maml.test_results["acc_ci95"] == pytest.approx(1.96 * accs.std().item() / math.sqrt(5))
    assert maml.test_results["acc_steps"] == pytest.approx(outcome.scores.double().mean(0).tolist())
    per_step = (1.96 * outcome.scores.double().std(0) / math.sqrt(5)).tolist()  # every step's own interval
    assert len(set(per_step)) > 1, "the test case does not tell the steps' intervals apart"
    assert maml.test_results["acc_steps_ci95"] == pytest.approx(per_step)
    assert maml.test_results["acc_before_ci95"] == pytest.approx(per_step[0])
    assert maml.test_results["loss"] == pytest.approx(outcome.loss.mean().item(), rel=1e-6)


def test_gradient_clipping_bounds_the_outer_step():
    model = tiny_conv4()
    before = [p.detach().clone() for p in model.parameters()]
    make_trainer(max_steps=1).fit(MAML(model, optimizer=SGD1, gradient_clip_val=1e-3), loader(TrainStream(1, 2)))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-4)


class _Poisoned(TrainStream):
    """Meta-batches whose support images are NaN at the listed indices."""

    def __init__(self, bad: set[int], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad = bad

    def __getitem__(self, g: int):
        batch = super().__getitem__(g)
        if g in self.bad:
            batch["support_x"] = torch.full_like(batch["support_x"], float("nan"))
        return batch


def test_non_finite_step_is_skipped_with_a_warning():
    model = tiny_conv4()
    maml = MAML(model, optimizer=SGD1)
    with pytest.warns(UserWarning, match="Skipped meta-step"):
        make_trainer(max_steps=2).fit(maml, loader(_Poisoned({0}, 3, 2)))
    assert maml.nonfinite_total == 1 and maml.nonfinite_streak == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert maml.trainer.global_step == 2  # the poisoned batch did not count as a step


def test_too_many_non_finite_steps_in_a_row_abort():
    maml = MAML(tiny_conv4(), max_nonfinite_steps=2)
    with pytest.warns(UserWarning, match="Skipped"), pytest.raises(NonFiniteMetaStepError, match="2 meta-steps in a row"):
        make_trainer(max_steps=5).fit(maml, loader(_Poisoned({0, 1, 2}, 3, 2)))


def test_evaluation_refuses_inference_mode():
    with pytest.raises(ConfigError, match="inference_mode=False"):
        make_trainer(inference_mode=True).validate(MAML(tiny_conv4()), loader(EvalTasks(2, 2)), verbose=False)


def test_checkpoint_holds_plain_hyperparameters(tmp_path):
    maml = MAML(tiny_conv4(), inner_lr=0.3, optimizer=SGD1)
    trainer = make_trainer(max_steps=1)
    trainer.fit(maml, loader(TrainStream(1, 2)))
    path = tmp_path / "maml.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["inner_lr"] == 0.3 and "optimizer" not in checkpoint["hyper_parameters"]
    restored = MAML.load_from_checkpoint(path, model=tiny_conv4(seed=1))
    for a, b in zip(restored.model.parameters(), maml.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task_parallel": "threads"}, "task_parallel='threads'"),
    ({"max_nonfinite_steps": 0}, "max_nonfinite_steps=0"),
    ({"gradient_clip_val": -1.0}, "gradient_clip_val=-1.0"),
    ({"inner_lr": 0.0}, "learning rate 0.0"),
])
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MAML(tiny_conv4(), **kwargs)


def test_running_statistics_option_trains_them_and_freezes_them_at_evaluation():
    model = tiny_conv4(track_running_stats=True)
    maml = MAML(model, task_parallel="auto")
    trainer = make_trainer(max_steps=1)
    trainer.fit(maml, loader(TrainStream(1, 2)))
    assert maml.path() == "loop"  # in-place running-statistics updates rule vmap out
    trained = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "running_mean" in k)
    trainer.validate(maml, loader(EvalTasks(2, 2)), verbose=False)
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k], v), k
