"""Meta-RL (data=navigation2d, algo=maml_rl and maml_ppo): the environment, the baseline, the meta-gradient, TRPO's solver, PPO's clipped step, learning, bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.algorithms import MAMLPPO, MAMLRL  # noqa: E402
from metalight.algorithms.rl.maml_ppo import clipped_ratio  # noqa: E402
from metalight.algorithms.rl.policy_gradient import (  # noqa: E402
    Rollouts,
    baseline_features,
    discounted_returns,
    fit_linear_baseline,
    gae,
    gaussian_log_prob,
)
from metalight.algorithms.rl.trpo import TRPO, conjugate_gradient  # noqa: E402
from metalight.models import GaussianMLP  # noqa: E402
from algo_tasks import assert_stops_with_one_line  # noqa: E402
from metalight.runs.training import train  # noqa: E402
from metalight.tasks import REINFORCEMENT, RLDataModule  # noqa: E402
from metalight.envs.navigation import Navigation2DEnv  # noqa: E402

# a short run: 10 validation and 20 test goals, 10 rollouts each
SMALL = ["experiment=quick_navigation2d", "data.n_val_tasks=10", "data.n_test_tasks=20", "data.eval_batch_size=20", "data.eval_rollouts=10", "logger=csv"]


def test_navigation_reward_clipping_and_horizon_by_hand() -> None:
    env = Navigation2DEnv(3, horizon=2, normalized_actions=False)
    observation, _ = env.reset(options={"tasks": torch.tensor([[0.3, 0.0], [0.0, 0.0], [0.2, -0.4]])})
    assert torch.equal(observation, torch.zeros(3, 2)), "every episode starts at the origin"
    position, reward, terminated, truncated, _ = env.step(torch.tensor([[0.5, 0.0], [0.005, -0.005], [-0.02, -3.0]]))
    # clipped to [-0.1, 0.1]: (0.1, 0), (0.005, -0.005), (-0.02, -0.1)
    assert torch.allclose(position, torch.tensor([[0.1, 0.0], [0.005, -0.005], [-0.02, -0.1]]))
    expected = -torch.tensor([0.2, math.hypot(0.005, 0.005), math.hypot(0.22, 0.3)])
    assert torch.allclose(reward, expected)
    assert terminated.tolist() == [False, True, False], "within 0.01 of the goal in both coordinates ends the episode"
    assert not truncated.any()
    _, reward, _, truncated, _ = env.step(torch.tensor([[0.05, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(reward[0], torch.tensor(-0.15)) and truncated.all(), "the horizon (2 steps) truncates every episode"
    # the authors' normalize(): the policy acts in [-1, 1], scaled by 0.1 before the clip
    env = Navigation2DEnv(1, normalized_actions=True)
    env.reset(options={"tasks": torch.tensor([[0.5, 0.5]])})
    position, *_ = env.step(torch.tensor([[0.5, 7.0]]))
    assert torch.allclose(position, torch.tensor([[0.05, 0.1]])) and env.single_action_space.high.tolist() == [1.0, 1.0]


def module(**options) -> RLDataModule:
    settings = dict(horizon=20, rollouts=3, meta_batch_size=4, n_val_tasks=4, n_test_tasks=4) | options
    datamodule = RLDataModule(**settings)
    datamodule.setup()
    return datamodule


def test_goals_are_finns_and_a_function_of_seed_split_epoch_and_index() -> None:
    datamodule = module()
    goals = torch.stack([datamodule.tasks("train")[[(e, i)]]["tasks"][0] for e in range(50) for i in range(20)])
    assert goals.shape == (1000, 2) and goals.min() >= -0.5 and goals.max() <= 0.5 and goals.min() < -0.45 and goals.max() > 0.45
    pair = datamodule.tasks("train")[[(3, 0), (3, 1)]]
    alone = datamodule.tasks("train")[[(3, 1)]]
    assert torch.equal(pair["tasks"][1], alone["tasks"][0]) and pair["seeds"][1] == alone["seeds"][0]
    assert not torch.equal(datamodule.tasks("val")[[(0, 0)]]["tasks"], datamodule.tasks("test")[[(0, 0)]]["tasks"])
    assert torch.equal(module(seed=7).tasks("test")[[(0, 2)]]["tasks"], datamodule.tasks("test")[[(0, 2)]]["tasks"]), "eval tasks: eval_seed only"


def learner(datamodule: RLDataModule, cls: type[MAMLRL] = MAMLRL, **options) -> MAMLRL:
    torch.manual_seed(0)
    algorithm = cls(GaussianMLP(2, 2, hidden=(8, 8), activation=options.pop("activation", "relu")), **options)
    algorithm.use_task_kind(datamodule.kind)
    return algorithm


def test_a_tasks_rollouts_do_not_depend_on_its_batch() -> None:
    datamodule = module()
    algorithm = learner(datamodule)
    theta = dict(algorithm.model.named_parameters())
    pair = datamodule.tasks("val")[[(0, 0), (0, 1)]]
    alone = datamodule.tasks("val")[[(0, 1)]]
    both = algorithm.rollouts(algorithm.per_task(theta, 2), pair, 0, 3)
    one = algorithm.rollouts(algorithm.per_task(theta, 1), alone, 0, 3)
    assert torch.equal(both.actions[1], one.actions[0]) and torch.equal(both.rewards[1], one.rewards[0])
    assert not torch.equal(algorithm.rollouts(algorithm.per_task(theta, 1), alone, 1, 3).actions, one.actions), "each phase has its own noise"


def random_rollouts(tasks: int = 3, rollouts: int = 4, horizon: int = 100) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(tasks, rollouts, horizon, dtype=torch.float64)
    mask[0, 1, 60:] = 0  # one episode ended early
    rewards = torch.randn(tasks, rollouts, horizon, generator=g, dtype=torch.float64) * mask
    return Rollouts(torch.randn(tasks, rollouts, horizon, 2, generator=g, dtype=torch.float64), torch.zeros(tasks, rollouts, horizon, 2), rewards, mask)


def test_linear_baseline_is_each_tasks_least_squares_fit_and_gae_one_is_returns_minus_values() -> None:
    rollouts = random_rollouts()
    returns = discounted_returns(rollouts.rewards, rollouts.mask, 0.9)
    assert torch.allclose(returns[1, 2, -2], rollouts.rewards[1, 2, -2] + 0.9 * rollouts.rewards[1, 2, -1])
    values = fit_linear_baseline(rollouts, returns, reg=1e-12)
    features = baseline_features(rollouts.observations, rollouts.mask)
    for task in range(3):
        x, y = features[task].flatten(0, 1), returns[task].flatten()
        weights = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution
        assert torch.allclose(values[task].flatten(), (x @ weights).squeeze(-1), atol=1e-6)
    assert torch.equal(values[0, 1, 60:], torch.zeros(40)), "no value after an episode ended"
    advantages = gae(rollouts.rewards, values, rollouts.mask, 0.9, 1.0)
    assert torch.allclose(advantages, (returns - values) * rollouts.mask, atol=1e-10)
    one_step = gae(rollouts.rewards, values, rollouts.mask, 0.9, 0.0)
    assert torch.allclose(one_step[2, 0, 3], rollouts.rewards[2, 0, 3] + 0.9 * values[2, 0, 4] - values[2, 0, 3])


def along_random_directions(objective, theta: dict[str, torch.Tensor], gradients: list, eps: float = 1e-6):
    """For 3 random directions d: the central difference of objective(weights) along d, and each gradient's d-component."""
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta.items()}
        with torch.no_grad():
            plus = objective({k: v + eps * direction[k] for k, v in theta.items()})
            minus = objective({k: v - eps * direction[k] for k, v in theta.items()})
        yield float((plus - minus) / (2 * eps)), [sum(float((gr * direction[k]).sum()) for gr, k in zip(grads, theta)) for grads in gradients]


def test_second_order_meta_gradient_matches_finite_differences() -> None:
    """The meta-gradient of the outer surrogate through one inner VPG step, against central differences in float64."""
    datamodule = module(horizon=10, rollouts=3)
    # tanh: with ReLU, zero biases and the origin as first observation put every unit at its kink, where the inner
    # gradient (hence the adapted weights) jumps
    algorithm = learner(datamodule, inner_lr=0.5, activation="tanh")
    algorithm.model.double()
    batch = datamodule.tasks("train")[[(0, 0), (0, 1), (0, 2)]]
    batch["tasks"] = batch["tasks"].double()
    theta = {k: v.detach().clone().requires_grad_() for k, v in algorithm.model.named_parameters()}
    support_rollouts = algorithm.rollouts(algorithm.per_task(theta, 3), batch, 0, 3)
    support = [(support_rollouts, algorithm.advantages(support_rollouts))]
    query = algorithm.rollouts(algorithm.adapt_on(algorithm.per_task(theta, 3), support, create_graph=False), batch, 1, 3)
    query_advantage = algorithm.advantages(query)
    with torch.no_grad():
        mean, std = algorithm.policy(algorithm.adapt_on(algorithm.per_task(theta, 3), support, create_graph=False), query.observations)
        old = (gaussian_log_prob(mean, std, query.actions), mean, std)

    def objective(weights: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        adapted = algorithm.adapt_on(algorithm.per_task(weights, 3), support, create_graph=create_graph)
        return algorithm.surrogate(adapted, query, query_advantage, old)[0].mean()

    second = torch.autograd.grad(objective(theta, True), list(theta.values()))
    first = torch.autograd.grad(objective(theta, False), list(theta.values()))
    for numeric, (analytic, first_order) in along_random_directions(lambda weights: objective(weights, False), theta, [second, first]):
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
        assert abs(first_order - numeric) > 1e-4 * abs(numeric), "the first-order gradient differs: the test sees the second-order term"


def test_evaluation_steps_after_the_first_take_eval_inner_lr_later() -> None:
    datamodule = module(horizon=20, rollouts=3)
    batch = datamodule.tasks("val")[[(0, 0), (0, 1)]]
    same = learner(datamodule, eval_inner_steps=2).evaluate_tasks(batch, "val", [0, 1]).scores
    halved = learner(datamodule, eval_inner_steps=2, eval_inner_lr_later=0.05).evaluate_tasks(batch, "val", [0, 1]).scores
    assert torch.equal(same[:, :2], halved[:, :2]) and not torch.equal(same[:, 2], halved[:, 2])


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    assert not torch.allclose(conjugate_gradient(lambda v: a @ v, b, iterations=1), torch.linalg.solve(a, b), atol=1e-3)


def backward_without_trainer(algorithm: MAMLRL) -> MAMLRL:
    """manual_backward needs a Trainer: outside one, a plain backward (one process, nothing to average)."""
    algorithm.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    return algorithm


def test_ppo_with_one_epoch_and_a_clip_that_never_binds_takes_maml_rls_first_order_meta_gradient() -> None:
    """PPO's first epoch starts at the weights that sampled: every ratio is 1, and a wide clip leaves -mean(r * A), MAMLRL's surrogate."""
    datamodule = module(horizon=20, rollouts=4)
    batch = datamodule.tasks("train")[[(0, 0), (0, 1), (0, 2)]]
    grads = {}
    for cls, options in ((MAMLRL, {}), (MAMLPPO, {"epochs": 1, "clip": 1e6})):
        algorithm = backward_without_trainer(learner(datamodule, cls, inner_lr=0.5, first_order=True, **options))
        outcome = algorithm.compute_meta_gradient(batch, measure=True)
        grads[cls] = ([p.grad.clone() for p in algorithm.model.parameters()], outcome)
    (maml, maml_outcome), (ppo, ppo_outcome) = grads[MAMLRL], grads[MAMLPPO]
    assert torch.equal(maml_outcome.scores, ppo_outcome.scores), "the same episodes before and after the inner step"
    torch.testing.assert_close(ppo_outcome.loss, maml_outcome.loss, rtol=0, atol=1e-7)
    assert any(bool(g.abs().max() > 1e-3) for g in maml)
    for a, b in zip(ppo, maml):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ppo_clip_zeroes_the_gradient_of_ratios_beyond_the_range_their_advantage_favours() -> None:
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 1.5, 0.9, 1.1], requires_grad=True)
    advantage = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    objective = clipped_ratio(ratio, advantage, 0.2) * advantage
    # min(r A, clip(r, 0.8, 1.2) A), by hand
    assert objective.tolist() == pytest.approx([0.5, 0.9, 1.1, 1.2, -0.8, -1.5, -0.9, -1.1])
    (grad,) = torch.autograd.grad(objective.sum(), ratio)
    # r = 1.5 with A > 0 and r = 0.5 with A < 0 are clipped (no pull further); r = 0.5 with A > 0 and r = 1.5 with A < 0,
    # where the new policy is worse than the old on them, keep their full gradient (the pessimistic bound)
    assert grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0]

    # through the learner: ratios pushed out of [0.8, 1.2] in their advantage's direction give no meta-gradient at
    # all; the same distance the other way gives one
    datamodule = module(horizon=20, rollouts=3)
    algorithm = learner(datamodule, MAMLPPO, clip=0.2)
    batch = datamodule.tasks("train")[[(0, 0), (0, 1)]]
    params, _, query, advantage, _ = algorithm.sample_meta_batch(batch)
    log_prob = algorithm.sampling_distribution(params, query)[0]
    assert bool((advantage != 0).any())
    for sign, zero in ((1.0, True), (-1.0, False)):
        loss = algorithm.clipped_surrogate(params, query, advantage, log_prob - sign * advantage.sign()).mean()
        grads = torch.autograd.grad(loss, list(algorithm.model.parameters()), retain_graph=True)
        assert all(bool((g == 0).all()) for g in grads) == zero, sign
    assert algorithm.last_clipped < 0.01  # the other way nothing is clipped


def test_ppo_second_order_meta_gradient_through_the_likelihood_ratio_inner_step_matches_finite_differences() -> None:
    """A later epoch: weights moved from the ones that sampled; the meta-gradient through the LVC inner step against central differences (float64)."""
    datamodule = module(horizon=10, rollouts=3)
    algorithm = learner(datamodule, MAMLPPO, inner_lr=0.5, clip=10.0, activation="tanh")
    algorithm.model.double()
    batch = datamodule.tasks("train")[[(0, 0), (0, 1), (0, 2)]]
    batch["tasks"] = batch["tasks"].double()
    params, support, query, advantage, _ = algorithm.sample_meta_batch(batch)
    sampled = algorithm.sampling_distribution(params, query)[0]
    assert len(support) == 1 and len(support[0]) == 3, "the support keeps its sampling log-likelihoods"
    g = torch.Generator().manual_seed(2)
    theta = {k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)).detach().requires_grad_() for k, v in algorithm.model.named_parameters()}

    def objective(weights: dict[str, torch.Tensor], create_graph: bool, inner: list) -> torch.Tensor:
        adapted = algorithm.adapt_on(algorithm.per_task(weights, 3), inner, create_graph=create_graph)
        return algorithm.clipped_surrogate(adapted, query, advantage, sampled).mean()

    second = torch.autograd.grad(objective(theta, True, support), list(theta.values()))
    reinforce = torch.autograd.grad(objective(theta, True, [entry[:2] for entry in support]), list(theta.values()))
    for numeric, (analytic, log_likelihood) in along_random_directions(lambda weights: objective(weights, False, support), theta, [second, reinforce]):
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
        assert abs(log_likelihood - numeric) > 1e-4 * abs(numeric), "the log-likelihood inner step gives another gradient: the test sees the ratios"


def test_ppo_rejects_bad_settings_and_trpo() -> None:
    from metalight.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.clip=0 is not valid"):
        MAMLPPO(GaussianMLP(2, 2), clip=0)
    with pytest.raises(ConfigError, match="algo.epochs=0 is not valid"):
        MAMLPPO(GaussianMLP(2, 2), epochs=0)
    with pytest.raises(ConfigError, match="not TRPO: use algo=maml_rl"):
        MAMLPPO(GaussianMLP(2, 2), optimizer=TRPO)


def test_without_inner_steps_the_meta_gradient_is_reinforces_finn_et_als_pretrained_loss() -> None:
    """algo.inner_steps=0: the surrogate -mean(pi / pi_old * A) at pi = pi_old has the gradient of REINFORCE's -mean(log pi * A)
    on the meta-policy's own episodes, the loss Finn et al.'s code steps with Adam for its pretrained baseline (use_maml=False)."""
    datamodule = module(horizon=20, rollouts=4)
    batch = datamodule.tasks("train")[[(0, 0), (0, 1), (0, 2)]]
    algorithm = backward_without_trainer(learner(datamodule, inner_steps=0))
    algorithm.compute_meta_gradient(batch, measure=True)
    theta = dict(algorithm.model.named_parameters())
    episodes = algorithm.rollouts(algorithm.per_task(theta, 3), batch, 0, 4)  # the same episodes: phase 0, the meta-policy's
    mean, std = algorithm.policy(algorithm.per_task(theta, 3), episodes.observations)
    log_prob = gaussian_log_prob(mean, std, episodes.actions)
    reinforce = -(log_prob * algorithm.advantages(episodes)).flatten(1).mean(1).mean()  # mean over each task's R x T steps, then tasks
    expected = torch.autograd.grad(reinforce, list(theta.values()))
    assert any(bool(g.abs().max() > 1e-3) for g in expected)
    for p, g in zip(theta.values(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_finn_navigation_protocols_their_test_and_their_pretrained_baseline(compose_generated) -> None:
    """navigation2d_finn tests with the authors' 40 goals x 40 rollouts; navigation2d_finn_pretrained trains as their code does: Adam, 1e-3, no inner step."""
    from hydra.utils import instantiate

    maml = compose_generated("experiment=navigation2d_finn")
    assert (maml.data.n_test_tasks, maml.data.eval_rollouts, maml.algo.eval_inner_lr_later) == (40, 40, 0.05)
    cfg = compose_generated("experiment=navigation2d_finn_pretrained")
    assert cfg.algo.inner_steps == 0 and cfg.data == maml.data and cfg.trainer.max_steps == maml.trainer.max_steps
    optimizer = instantiate(cfg.algo, model=instantiate(cfg.model)).configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-3
    assert isinstance(instantiate(maml.algo, model=instantiate(maml.model)).configure_optimizers(), TRPO)


# 30-step episodes (a goal is at most 7 steps away): two short runs cost what one run of 100-step episodes did
SHORT = [*SMALL, "data.horizon=30", "data.meta_batch_size=8", "data.rollouts=8", "trainer.max_steps=8", "data.batches_per_epoch=8"]


def test_maml_rl_adapts_beyond_a_pretrained_policy_of_the_same_budget(compose_generated, tmp_path) -> None:
    """What only meta-learning gives: after one inner step on 20 test goals MAML-RL's return beats, by a margin, the
    pretrained baseline's (the same learner with algo.inner_steps=0: TRPO on the same tasks for as many meta-steps);
    TensorBoard gets the curves and trajectories."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metalight.visualization import read_scalars

    scores = {}
    for name, options in (("maml", ["logger=tensorboard"]), ("pretrained", ["algo.inner_steps=0"])):
        metrics, objects = train(compose_generated(*SHORT, *options, folder=name))
        assert objects["algorithm"].task_kind.name == REINFORCEMENT.name and objects["trainer"].global_step == 8
        scores[name] = [metrics[f"test/return_step{k}"] for k in range(4)]
        assert metrics["test/return"] == scores[name][-1] and math.isfinite(metrics["test/return_ci95"])
    maml, pretrained = scores["maml"], scores["pretrained"]
    # measured with seeds 42 / 1 / 2 / 3, after one step: MAML-RL -7.9 / -7.8 / -7.7 / -7.4, pretrained -12.4 / -12.4 /
    # -12.1 / -13.0 (before adaptation -13.7 / -12.8 / -12.2 / -12.8 and -17.3 / -16.8 / -17.2 / -16.5)
    assert maml[1] > pretrained[1] + 2, (maml, pretrained)
    run = tmp_path / "maml" / "run"
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "val_navigation/trajectories" in events.Tags()["images"]
    assert {f"val/return_step{k}" for k in range(4)} | {"train/return", "train/return_before", "train/trpo_kl"} <= set(read_scalars(run))


def test_maml_ppo_adapts_beyond_a_pretrained_policy_of_the_same_budget(compose_generated) -> None:
    """As for MAML-RL: after one inner step MAML-PPO (5 Adam epochs per meta-batch, ProMP's) beats by a margin the same
    learner trained without inner step for as many meta-steps. Adam's step is 1e-2, not ProMP's 1e-3, so that 8
    meta-steps learn (at 1e-3 the two were 1 point apart after one step)."""
    scores = {}
    for name, options in (("maml", []), ("pretrained", ["algo.inner_steps=0"])):
        metrics, objects = train(compose_generated(*SHORT, "algo=maml_ppo", "algo.optimizer.lr=0.01", *options, folder=name))
        assert objects["trainer"].global_step == 8, "a meta-step is a meta-batch, whatever its epochs"
        adam = objects["trainer"].optimizers[0]
        assert all(int(state["step"]) == 5 * 8 for state in adam.state.values()), "5 Adam steps per meta-batch"
        scores[name] = [metrics[f"test/return_step{k}"] for k in range(4)]
    maml, pretrained = scores["maml"], scores["pretrained"]
    # measured with seeds 42 / 1 / 2 / 3, after one step: MAML-PPO -6.3 / -6.8 / -7.5 / -7.1, pretrained -12.0 / -11.1 /
    # -11.1 / -12.1
    assert maml[1] > pretrained[1] + 2, (maml, pretrained)


@pytest.mark.parametrize("algo", ["maml_rl", "maml_ppo"])
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(compose_generated, tmp_path, caplog, algo) -> None:
    """Stopped after 2 of 4 meta-steps and restarted in its run folder (as a requeued job): the same weights bit for bit (MAML-PPO: Adam's moments too)."""
    tiny = ["experiment=quick_navigation2d", f"algo={algo}", "data.horizon=20", "data.meta_batch_size=4", "data.rollouts=4", "data.n_val_tasks=4",
            "data.eval_rollouts=4", "data.batches_per_epoch=2", "test=false", "logger=csv", "callbacks.last_checkpoint.every_n_steps=1"]
    train(compose_generated(*tiny, "trainer.max_steps=4", folder="whole"))
    train(compose_generated(*tiny, "trainer.max_steps=2", folder="resumed"))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="metalight.runs.training")
    _, objects = train(compose_generated(*tiny, "trainer.max_steps=4", folder="resumed"))
    assert objects["trainer"].global_step == 4
    assert any("Resuming from" in record.getMessage() for record in caplog.records), "the second half continued from last.ckpt"
    whole = torch.load(tmp_path / "whole" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_missing_rl_extra_is_named(monkeypatch) -> None:
    import sys

    from metalight.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # as if not installed: importing it fails
    monkeypatch.delitem(sys.modules, "metalight.envs.navigation")  # imported again, without gymnasium
    with pytest.raises(ConfigError, match=r"data.env=navigation2d needs the `rl` extra \(gymnasium is not installed\): pip install -e '.\[rl\]'"):
        RLDataModule()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.horizon=0"], "data.horizon=0 is not valid"),
        (["data.rollouts=0"], "data.rollouts=0 is not valid"),
        (["model.out_features=3"], "the policy outputs 3 action dimensions but data.env=navigation2d takes 2: set model.out_features=2"),
        (["model.in_features=5"], "set model.in_features=2"),
        (["data.env=cheetah"], "data.env='cheetah' is not known: use one of navigation2d"),
        (["model=mlp"], "algo=maml_rl needs a Gaussian policy returning (mean, std), but MLP does not: use model=gaussian_mlp"),
        (["algo=maml"], "gives reinforcement tasks: choose algo=maml_rl (or fomaml_rl, maml_ppo, rl2)"),
        (["algo=maml_ppo", "algo.clip=0"], "algo.clip=0 is not valid: use a number > 0"),
        (["algo=maml_ppo", "algo.optimizer._target_=metalight.algorithms.TRPO"], "not TRPO: use algo=maml_rl"),
        (["data.env_options.goal_range=[0.5,-0.5]"], "data.env_options.goal_range=[0.5, -0.5] must be [low, high]"),
    ],
)
def test_bad_input_is_one_line_status_2_and_nothing_written(compose_generated, tmp_path, caplog, overrides, expected) -> None:
    """Through the entry point train.py wraps (cli.run_reporting_errors): one logged line, exit status 2, no run folder content."""
    cfg = compose_generated("experiment=quick_navigation2d", *overrides)
    assert_stops_with_one_line(cfg, caplog, tmp_path / "run", expected)
