"""Reptile as a LightningModule: the meta-update against torch.optim on clones, eps annealing, evaluation modes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import EvalTasks, TrainStream, loader, make_batch, make_trainer, tiny_conv4
from omegaconf import OmegaConf

from metalight.algorithms import Reptile
from metalight.algorithms.functional import minibatch_indices
from metalight.algorithms.reptile import task_generator
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
    reptile = Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, meta_lr_final=0.1, seed=7)
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


def test_query_is_scored_only_on_logging_steps():
    reptile = Reptile(tiny_conv4(), inner_batch_size=4)
    scored = []
    adapt = reptile.adapt
    reptile.adapt = lambda *args, **kwargs: scored.append(kwargs["record"]) or adapt(*args, **kwargs)
    trainer = make_trainer(max_steps=4, log_every_n_steps=2)
    trainer.fit(reptile, loader(TrainStream(4, 2, k_shot=3)))
    assert scored == ["none", "ends", "none", "ends"]
    assert {"train/loss", "train/acc", "train/acc_before"} <= set(trainer.callback_metrics)


def test_checkpoint_loads_with_weights_only(tmp_path):
    reptile = Reptile(tiny_conv4(), inner_betas=OmegaConf.create([0.0, 0.99]), inner_batch_size=4)  # as Hydra passes it
    trainer = make_trainer(max_steps=1)
    trainer.fit(reptile, loader(TrainStream(1, 2)))
    trainer.save_checkpoint(tmp_path / "reptile.ckpt")
    checkpoint = torch.load(tmp_path / "reptile.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["inner_betas"] == (0.0, 0.99)
