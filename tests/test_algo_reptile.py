"""Reptile as a LightningModule: the meta-update against torch.optim on clones, eps annealing, evaluation modes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4
from omegaconf import OmegaConf
from reptile_reference import adapt_task, reference_reptile

from metalight.algorithms import Reptile
from metalight.algorithms.optimization.functional import minibatch_indices
from metalight.algorithms.optimization import reptile as reptile_module
from metalight.algorithms.optimization.reptile import task_generator
from metalight.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def reference_reptile_step(model, batch, indices, lr, steps, eps):
    """theta + eps * mean_i(phi_i - theta), each phi_i from torch.optim.Adam(beta1=0) on a clone."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    phis = []
    for i in range(batch["support_x"].shape[0]):
        clone = copy.deepcopy(model)
        optimizer = torch.optim.Adam(clone.parameters(), lr=lr, betas=(0.0, 0.999))
        for step in range(steps):
            chosen = indices[i, step]
            optimizer.zero_grad()
            F.cross_entropy(clone(batch["support_x"][i][chosen]), batch["support_y"][i][chosen]).backward()
            optimizer.step()
        phis.append(dict(clone.named_parameters()))
    return {k: theta[k] + eps * (torch.stack([phi[k].detach() for phi in phis]).mean(0) - theta[k]) for k in theta}


def test_meta_update_moves_theta_toward_the_adapted_weights_with_annealed_eps():
    model = tiny_conv4(dtype=F64)
    start = copy.deepcopy(model)
    reptile = Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, meta_lr_final=0.1, seed=7, inner_state="fresh")
    trainer = make_trainer(max_steps=3, precision="64-true")
    trainer.fit(reptile, loader(TrainStream(3, 2, k_shot=3, dtype=F64)))

    # replay the three meta-steps with the same minibatches and eps = 0.5, 0.5 - 0.4/3, 0.5 - 0.8/3
    for step in range(3):
        batch = make_batch(2, k_shot=3, seed=step, dtype=F64)
        indices = torch.stack([minibatch_indices(9, reptile.train_loop, task_generator(7, "train", step, i)) for i in range(2)])
        target = reference_reptile_step(start, batch, indices, lr=0.01, steps=3, eps=0.5 - 0.4 * step / 3)
        with torch.no_grad():
            for k, p in start.named_parameters():
                p.copy_(target[k])
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-8, msg=name)
    assert reptile.optimizers().param_groups[0]["lr"] == pytest.approx(0.1)


def _train_persistent(path: str, steps: int = 3, meta_batch: int = 2) -> tuple[Reptile, torch.nn.Module]:
    """A float64 Reptile with the persistent inner Adam trained `steps` meta-steps, and its starting network."""
    model = tiny_conv4(dtype=F64)
    start = copy.deepcopy(model)
    reptile = Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, meta_lr_final=0.1, seed=7, task_parallel=path)
    make_trainer(max_steps=steps, precision="64-true").fit(reptile, loader(TrainStream(steps, meta_batch, k_shot=3, dtype=F64)))
    return reptile, start


def _assert_matches_reference(reptile: Reptile, start: torch.nn.Module, steps: int, meta_batch: int, shares: int) -> None:
    """theta and the inner Adam state equal reference_reptile's (torch.optim.Adam) on the same tasks and minibatches."""
    batches = [make_batch(meta_batch, k_shot=3, seed=step, dtype=F64) for step in range(steps)]

    def plans(step: int, task: int) -> torch.Tensor:
        return minibatch_indices(9, reptile.train_loop, task_generator(7, "train", step, task))

    theta, adam = reference_reptile(start, batches, plans, lr=0.01, eps=lambda step: 0.5 - 0.4 * step / steps, shares=shares)
    state = reptile.inner_optimizer_state
    assert state.step == int(adam["state"][0]["step"])
    for i, (name, p) in enumerate(reptile.model.named_parameters()):
        # a conv bias feeding a BatchNorm has an exact gradient of 0: it gets rounding noise (1e-17), which
        # differs with the order of the sums and which Adam divides by eps = 1e-8 into steps of ~1e-10
        noise_only = name.endswith(".0.bias") and name.startswith("features.")
        torch.testing.assert_close(p.detach(), theta[name], rtol=0, atol=1e-8 if noise_only else 1e-9, msg=name)
        torch.testing.assert_close(state.m[name], adam["state"][i]["exp_avg"], rtol=0, atol=1e-9, msg=name)
        torch.testing.assert_close(state.v[name], adam["state"][i]["exp_avg_sq"], rtol=0, atol=1e-9, msg=name)


def test_persistent_inner_adam_is_one_long_lived_torch_adam():
    reptile, start = _train_persistent("loop")
    assert reptile.inner_optimizer_state.step == 3 * 2 * 3  # meta-steps x tasks x inner steps, carried task to task
    _assert_matches_reference(reptile, start, steps=3, meta_batch=2, shares=1)


def test_vmap_carries_the_mean_of_the_meta_batch_final_states():
    # every task of a meta-batch starts from the same state: the reference with one task per share
    reptile, start = _train_persistent("vmap", steps=2, meta_batch=3)
    assert reptile.inner_optimizer_state.step == 2 * 3
    _assert_matches_reference(reptile, start, steps=2, meta_batch=3, shares=3)


def test_fresh_and_persistent_states_train_differently():
    persistent, _ = _train_persistent("loop", steps=2)
    fresh = Reptile(tiny_conv4(dtype=F64), inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, meta_lr_final=0.1, seed=7, inner_state="fresh")
    make_trainer(max_steps=2, precision="64-true").fit(fresh, loader(TrainStream(2, 2, k_shot=3, dtype=F64)))
    assert fresh.inner_optimizer_state is None
    differs = [not torch.allclose(p, q) for p, q in zip(persistent.model.parameters(), fresh.model.parameters())]
    assert any(differs)


def test_evaluation_starts_each_task_from_a_copy_of_the_training_state():
    reptile, _ = _train_persistent("loop", steps=2)
    state = reptile.inner_optimizer_state
    saved = (state.step, {k: v.clone() for k, v in state.m.items()}, {k: v.clone() for k, v in state.v.items()})
    batch = make_batch(2, k_shot=3, seed=11, dtype=F64)
    reptile.eval_loop = reptile.train_loop  # 3 steps on minibatches of 4, lr 0.01
    outcome = reptile.evaluate_tasks(batch, "test", [0, 1], keep_logits=True)

    names = [name for name, _ in reptile.model.named_parameters()]
    theta = {k: v.detach().clone() for k, v in reptile.model.named_parameters()}
    plans = reptile.task_indices(batch, reptile.eval_loop, "test", [0, 1])
    for task in range(2):  # each task: a torch Adam loaded with the training state, as supervised-reptile's evaluate()
        clone = copy.deepcopy(reptile.model)
        adam = torch.optim.Adam(clone.parameters(), lr=0.01, betas=(0.0, 0.999))
        adam.load_state_dict({
            "state": {i: {"step": torch.tensor(float(saved[0])), "exp_avg": saved[1][n].clone(), "exp_avg_sq": saved[2][n].clone()} for i, n in enumerate(names)},
            "param_groups": adam.state_dict()["param_groups"],
        })
        adapt_task(clone, adam, theta, batch["support_x"][task], batch["support_y"][task], plans[task])
        torch.testing.assert_close(outcome.logits[task, -1], clone(batch["query_x"][task]).detach(), rtol=0, atol=1e-9)
    assert reptile.inner_optimizer_state.step == saved[0]  # never written back
    for name in names:
        assert torch.equal(reptile.inner_optimizer_state.m[name], saved[1][name]) and torch.equal(reptile.inner_optimizer_state.v[name], saved[2][name])


@pytest.mark.parametrize(
    "options, message",
    [({"inner_state": "kept"}, "algo.inner_state='kept' is not known"), ({"inner_optimizer": "sgd"}, "algo.inner_state=persistent keeps")],
)
def test_bad_inner_state_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Reptile(tiny_conv4(), **options)


def test_sgd_with_fresh_state_trains():
    reptile = Reptile(tiny_conv4(), inner_optimizer="sgd", inner_state="fresh", inner_batch_size=4)
    make_trainer(max_steps=1).fit(reptile, loader(TrainStream(1, 2)))
    assert reptile.inner_optimizer_state is None


@pytest.mark.parametrize("transductive", [True, False])
def test_evaluation_fine_tunes_from_theta(transductive):
    model = tiny_conv4()
    before = copy.deepcopy(model.state_dict())
    reptile = Reptile(model, eval_inner_steps=4, eval_inner_lr=0.01, eval_inner_batch_size=4, transductive=transductive)
    make_trainer().test(reptile, loader(EvalTasks(3, 2, k_shot=3)), verbose=False)
    results = reptile.test_results
    assert results["n_tasks"] == 3 and len(results["acc_steps"]) == 5
    assert 0.0 <= results["acc"] <= 1.0 and results["acc_ci95"] >= 0.0
    for name, value in model.state_dict().items():  # evaluation never touches theta
        assert torch.equal(value, before[name]), name


def test_adam_outer_optimizer_takes_meta_lr():
    reptile = Reptile(tiny_conv4(), optimizer=functools.partial(torch.optim.Adam, betas=(0.9, 0.99)), meta_lr=0.01, meta_lr_final=0.01)
    trainer = make_trainer(max_steps=2)
    trainer.fit(reptile, loader(TrainStream(2, 2)))
    assert isinstance(reptile.optimizers().optimizer, torch.optim.Adam)
    assert reptile.optimizers().param_groups[0]["lr"] == pytest.approx(0.01)
    assert trainer.callback_metrics["train/outer_lr"] == pytest.approx(0.01)


def test_bad_eps_schedule_is_refused():
    with pytest.raises(ConfigError, match="meta_lr=0.0"):
        Reptile(tiny_conv4(), meta_lr=0.0)


def test_query_is_scored_only_on_logging_steps(monkeypatch):
    reptile = Reptile(tiny_conv4(), inner_batch_size=4)
    scored = []
    build = reptile_module.make_task_fn  # the persistent state's loop path builds one task function per task
    monkeypatch.setattr(reptile_module, "make_task_fn", lambda *args, **kwargs: scored.append(kwargs["record"]) or build(*args, **kwargs))
    trainer = make_trainer(max_steps=4, log_every_n_steps=2)
    trainer.fit(reptile, loader(TrainStream(4, 2, k_shot=3)))
    assert scored == ["none"] * 2 + ["ends"] * 2 + ["none"] * 2 + ["ends"] * 2
    assert {"train/loss", "train/acc", "train/acc_before"} <= set(trainer.callback_metrics)


def test_checkpoint_loads_with_weights_only(tmp_path):
    reptile = Reptile(tiny_conv4(), inner_betas=OmegaConf.create([0.0, 0.99]), inner_batch_size=4)  # as Hydra passes it
    trainer = make_trainer(max_steps=1)
    trainer.fit(reptile, loader(TrainStream(1, 2)))
    trainer.save_checkpoint(tmp_path / "reptile.ckpt")
    checkpoint = torch.load(tmp_path / "reptile.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["inner_betas"] == (0.0, 0.99)
