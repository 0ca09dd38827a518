"""ANIL, Meta-SGD and MAML++ on MAML's meta-step: exact meta-gradients (learned step sizes and per-step BatchNorm
included), vmap = loop, ANIL's head-only inner loop, and MAML++'s schedules (MSL, DA, CA) and BNRS."""

from __future__ import annotations

import copy
import dataclasses
import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from algo_tasks import TrainStream, loader, make_batch, make_trainer, tiny_conv4
from torch import nn

from metalight.algorithms import ANIL, MAML, MAMLpp, MetaSGD
from metalight.algorithms.optimization.functional import make_task_fn, run_tasks, split_state
from metalight.algorithms.optimization.mamlpp import msl_weights
from metalight.errors import ConfigError
from metalight.models.step_norm import StepBatchNorm2d, inner_step, recording_batch_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SGD1 = functools.partial(torch.optim.SGD, lr=1.0)


def build(name: str, steps: int, path: str = "loop", dtype: torch.dtype = F64, **options):
    """One of the family on the tiny strided conv4, with an outer SGD of LR 1 (so a step moves theta by -grad)."""
    model = tiny_conv4(dtype=dtype)
    common = dict(inner_lr=0.3, inner_steps=steps, eval_inner_steps=steps, optimizer=SGD1, task_parallel=path)
    if name == "anil":
        return ANIL(model, **common, **options)
    if name == "metasgd":
        return MetaSGD(model, **common, **options)
    return MAMLpp(model, **common, ca=False, msl_epochs=2, **options)  # MSL on at epoch 0: its weighted loss is tested too


def objective(algorithm, batch, loss_weights) -> float:
    """The mean (MSL-weighted) query loss of adapting each task from the current meta-parameters: values only."""
    params, fixed = split_state(algorithm.model)
    loop = dataclasses.replace(algorithm.train_loop, first_order=True)
    options = algorithm.inner_options(training=False)
    fn = make_task_fn(algorithm.model, fixed, loop, "loop", record="last", loss_weights=loss_weights, **options)
    with torch.no_grad():
        return run_tasks(fn, params, batch, None, "loop", second_order=False).loss.mean().item()


def one_meta_step(algorithm, n_tasks: int = 3) -> dict[str, torch.Tensor]:
    """The meta-gradient the training step applied: theta_before - theta_after under SGD(lr=1), for every meta-parameter."""
    before = {k: v.detach().clone() for k, v in algorithm.named_parameters()}
    make_trainer(max_steps=1, precision="64-true").fit(algorithm, loader(TrainStream(1, n_tasks, dtype=F64)))
    return {k: before[k] - v.detach() for k, v in algorithm.named_parameters()}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["anil", "metasgd", "mamlpp"])
def test_meta_gradient_matches_finite_differences(name, steps):
    algorithm = build(name, steps)
    start = copy.deepcopy(algorithm.state_dict())
    batch = make_batch(3, seed=0, dtype=F64)  # what TrainStream(1, 3) yields as meta-batch 0
    loss_weights = algorithm.loss_weights()  # those of epoch 0, where the step happens
    grads = one_meta_step(algorithm)
    algorithm.load_state_dict(start)
    assert name == "anil" or any(k.startswith("step_sizes.") for k in grads), "the learned step sizes are meta-parameters"

    generator = torch.Generator().manual_seed(1)
    params = dict(algorithm.named_parameters())
    direction = {k: torch.randn(p.shape, generator=generator, dtype=F64) for k, p in params.items()}
    analytic = sum((grads[k] * direction[k]).sum() for k in params).item()
    # small: with BatchNorm weights held fixed in the inner loop (MAML++) the tiny net's 1x1 feature maps put
    # ReLU kinks within 1e-6 of these weights; rounding error stays near 1e-16 / h = 1e-9
    h = 1e-7

    def objective_at(sign: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.add_(sign * h * direction[k])
        value = objective(algorithm, batch, loss_weights)
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(sign * h * direction[k])
        return value

    numeric = (objective_at(1.0) - objective_at(-1.0)) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)

    # and along the learned step sizes and MAML++'s per-step BatchNorm weights alone, where they exist
    per_step_norms = {f"model.{m}." for m, module in algorithm.model.named_modules() if isinstance(module, StepBatchNorm2d)}
    special = [k for k in params if k.startswith("step_sizes.") or any(k.startswith(prefix) for prefix in per_step_norms)]
    assert bool(special) == (name != "anil")
    if special:
        direction = {k: (direction[k] if k in special else torch.zeros_like(direction[k])) for k in params}
        analytic = sum((grads[k] * direction[k]).sum() for k in params).item()
        numeric = (objective_at(1.0) - objective_at(-1.0)) / (2 * h)
        assert abs(analytic) > 1e-8 and abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("name", ["anil", "metasgd", "mamlpp"])
def test_vmap_and_loop_meta_steps_agree(name):
    grads = {path: one_meta_step(build(name, steps=2, path=path)) for path in ("loop", "vmap")}
    for k, g in grads["loop"].items():
        torch.testing.assert_close(grads["vmap"][k], g, rtol=0, atol=1e-10, msg=k)


def test_anil_adapts_only_the_head_and_its_meta_gradient_reaches_the_body():
    anil = build("anil", steps=3)
    params, fixed = split_state(anil.model)
    fn = make_task_fn(anil.model, fixed, anil.eval_loop, "loop", return_params=True, **anil.inner_options(training=False))
    adapted = run_tasks(fn, {k: v.detach() for k, v in params.items()}, make_batch(2, dtype=F64), None, "loop", False).params
    for k, v in params.items():
        moved = not torch.equal(adapted[k][0], v.detach())
        assert moved == k.startswith("head."), k
    grads = one_meta_step(anil)
    assert all(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("model.features.") and "0.0.bias" not in k)


def test_anil_embedding_once_equals_adapting_the_head_through_the_whole_network():
    """The fast path (body run once per task) against the plain one (the whole network at every step, head adapted)."""
    anil = build("anil", steps=2)
    params, fixed = split_state(anil.model)
    batch = make_batch(3, dtype=F64)
    head = anil.inner_options(training=True)["adapted"]
    outcomes = [
        run_tasks(make_task_fn(anil.model, fixed, anil.train_loop, "loop", **options), params, batch, None, "loop", True)
        for options in ({"adapted": head, "body": "features"}, {"adapted": head})
    ]
    fast, slow = (torch.autograd.grad(o.loss.mean(), list(params.values())) for o in outcomes)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_msl_weights_sum_to_one_and_anneal_as_the_authors_do():
    for epoch in range(0, 25):
        assert sum(msl_weights(5, epoch, 10)) == pytest.approx(1.0, abs=1e-12)
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 5, 10) == pytest.approx([0.1] * 4 + [0.6])  # each earlier step loses 0.2 / 10 per epoch
    assert msl_weights(5, 10, 10) == pytest.approx([0.006] * 4 + [0.976])  # floor 0.03 / 5
    algorithm = build("mamlpp", steps=5)
    algorithm.trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    for epoch, expected in ((0, msl_weights(5, 0, 2)), (1, msl_weights(5, 1, 2)), (2, None)):
        algorithm.trainer.fit_loop.epoch_progress.current.completed = epoch
        assert algorithm.current_epoch == epoch and algorithm.loss_weights() == expected


def test_derivative_order_annealing_switches_at_the_configured_epoch():
    algorithm = build("mamlpp", steps=2, da=True, da_epochs=3)
    algorithm.trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    orders = []
    for epoch in range(5):
        algorithm.trainer.fit_loop.epoch_progress.current.completed = epoch
        orders.append(algorithm.current_train_loop().first_order)
    assert orders == [True, True, True, False, False]
    assert not build("mamlpp", steps=2, da=False).current_train_loop().first_order


def test_cosine_annealing_of_the_outer_lr():
    model = tiny_conv4()
    algorithm = MAMLpp(model, inner_steps=1, eval_inner_steps=1, min_lr=1e-4, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    algorithm.trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    config = algorithm.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-2) and lrs[5] == pytest.approx((1e-2 + 1e-4) / 2) and lrs[10] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_step_batch_norm_uses_the_row_of_the_step_and_records_batch_statistics():
    layer = StepBatchNorm2d(3, steps=2, per_step_weights=True, per_step_statistics=True).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [2.0, 3.0, 4.0]]))
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    with recording_batch_statistics() as records, inner_step(1):
        out = layer(x)
    expected = F.batch_norm(x, None, None, layer.weight[1], layer.bias[1], training=True)
    torch.testing.assert_close(out, expected)
    ((who, step, stats),) = records
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    assert who is layer and step == 1
    torch.testing.assert_close(stats, torch.stack([mean, var]))
    with inner_step(7):  # beyond the tables: the last row
        torch.testing.assert_close(layer(x), expected)


def test_bnrs_folds_the_task_mean_of_the_recorded_statistics_once_per_meta_step():
    algorithm = build("mamlpp", steps=2, transductive=False)
    layers = [m for m in algorithm.model.modules() if isinstance(m, StepBatchNorm2d)]
    assert len(layers) == 4 and all(m.use_running_statistics for m in layers)
    # what the meta-step will record, computed on its own: the task function of the same meta-parameters
    params, fixed = split_state(algorithm.model)
    plan: list = []
    options = algorithm.inner_options(training=True) | {"statistics_plan": plan}
    fn = make_task_fn(algorithm.model, fixed, algorithm.train_loop, "loop", loss_weights=algorithm.loss_weights(), **options)
    algorithm.model.train()
    recorded = run_tasks(fn, params, make_batch(3, seed=0, dtype=F64), None, "loop", True).batch_statistics
    assert len(plan) == len(recorded) > 0
    expected = {(id(layer), row): (torch.zeros_like(layer.running_mean[row]), torch.ones_like(layer.running_var[row])) for layer, row in plan}
    for (layer, row), stats in zip(plan, recorded):
        mean, var = expected[id(layer), row]
        task_mean = stats.detach().mean(dim=0)
        expected[id(layer), row] = (0.9 * mean + 0.1 * task_mean[0], 0.9 * var + 0.1 * task_mean[1])

    one_meta_step(algorithm)
    for layer, row in plan:
        torch.testing.assert_close(layer.running_mean[row], expected[id(layer), row][0])
        torch.testing.assert_close(layer.running_var[row], expected[id(layer), row][1])
    algorithm.eval()
    x = torch.randn(6, 1, 8, 8, dtype=F64)
    with torch.no_grad():  # eval mode with running statistics: an example's logits no longer depend on its batch
        torch.testing.assert_close(algorithm.model(x)[:2], algorithm.model(x[:2]))


def test_metasgd_step_sizes_drawn_from_the_papers_range():
    torch.manual_seed(0)
    first = MetaSGD(tiny_conv4(), inner_lr=0.01, inner_lr_range=[0.005, 0.1]).step_sizes.by_weight(detached=True)
    torch.manual_seed(0)
    again = MetaSGD(tiny_conv4(), inner_lr=0.01, inner_lr_range=[0.005, 0.1]).step_sizes.by_weight(detached=True)
    values = torch.cat([v.flatten() for v in first.values()])
    assert 0.005 <= values.min() and values.max() <= 0.1 and values.std() > 0.02  # uniform on [0.005, 0.1]: std 0.027
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded by the run
    constant = MetaSGD(tiny_conv4(), inner_lr=0.01).step_sizes.by_weight(detached=True)
    assert all(bool((v == 0.01).all()) for v in constant.values())
    with pytest.raises(ConfigError, match="inner_lr_range"):
        MetaSGD(tiny_conv4(), inner_lr_range=[0.1, 0.005])


def test_bad_values_are_one_clear_error():
    with pytest.raises(ConfigError, match="inner_lr=5"):
        build("metasgd", steps=1, dtype=torch.float32).__class__(tiny_conv4(), inner_lr=5.0)
    with pytest.raises(ConfigError, match="learning rate 0"):
        MAMLpp(tiny_conv4(), inner_lr=0.0, lslr=False)
    with pytest.raises(ConfigError, match="msl_epochs=-1"):
        MAMLpp(tiny_conv4(), msl_epochs=-1)
    with pytest.raises(ConfigError, match="bnrs"):
        MAMLpp(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(ConfigError, match="separable head"):
        ANIL(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))


def test_plain_maml_is_unchanged_by_the_family_hooks():
    """MAML's step through the generalized core equals the independent reference (guards the shared machinery)."""
    from test_algo_functional import reference_maml_gradient

    model = tiny_conv4(dtype=F64)
    theta = copy.deepcopy(model)
    grads = one_meta_step(MAML(model, inner_lr=0.3, inner_steps=2, optimizer=SGD1))
    expected = reference_maml_gradient(theta, make_batch(3, seed=0, dtype=F64), lr=0.3, steps=2, first_order=False)
    for (k, g), e in zip(grads.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=k)


def test_evaluation_beyond_the_training_steps_reuses_the_last_row_and_step_size():
    algorithm = build("mamlpp", steps=2, dtype=torch.float32)
    algorithm.eval_loop = dataclasses.replace(algorithm.eval_loop, steps=4)
    assert all(m.weight.shape[0] == 2 for m in algorithm.model.modules() if isinstance(m, StepBatchNorm2d))
    sizes = algorithm.step_sizes.by_weight(detached=True)
    assert {len(v) for v in sizes.values()} == {2}
    with torch.no_grad():
        for v in sizes.values():
            v.copy_(torch.tensor([0.0, 0.1]))  # no move at step 1, then 0.1 at every later step
    outcome = algorithm.evaluate_tasks(make_batch(2), "val", [0, 1], keep_logits=True)
    assert outcome.scores.shape == (2, 5)
    # step 1 moved nothing (its step size is 0): the logits before and after it are the same, later ones differ
    torch.testing.assert_close(outcome.logits[:, 1], outcome.logits[:, 0])
    assert not torch.allclose(outcome.logits[:, 4], outcome.logits[:, 2])


def test_learned_step_sizes_are_logged_as_their_mean():
    metasgd = build("metasgd", steps=1, dtype=torch.float32)
    with torch.no_grad():
        for i, size in enumerate(metasgd.step_sizes.sizes.values()):
            size.fill_(0.1 * (i % 2))
    sizes = torch.cat([s.flatten() for s in metasgd.step_sizes.sizes.values()])
    assert metasgd.mean_inner_lr() == pytest.approx(sizes.mean().item())
    assert MAML(tiny_conv4(), inner_lr=0.25).mean_inner_lr() == 0.25
