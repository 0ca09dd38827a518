"""Meta-RL (data=navigation2d, algo=maml_rl): the environment, the baseline, the meta-gradient, TRPO's solver, learning, bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.algorithms import MAMLRL  # noqa: E402
from metalight.algorithms.policy_gradient import (  # noqa: E402
    Rollouts,
    baseline_features,
    discounted_returns,
    fit_linear_baseline,
    gae,
)
from metalight.algorithms.trpo import conjugate_gradient  # noqa: E402
from metalight.models import GaussianMLP  # noqa: E402
from algo_tasks import assert_stops_with_one_line  # noqa: E402
from metalight.runs.training import train  # noqa: E402
from metalight.tasks import REINFORCEMENT, RLDataModule  # noqa: E402
from metalight.tasks.navigation import Navigation2DEnv  # noqa: E402

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


def learner(datamodule: RLDataModule, **options) -> MAMLRL:
    torch.manual_seed(0)
    algorithm = MAMLRL(GaussianMLP(2, 2, hidden=(8, 8), activation=options.pop("activation", "relu")), **options)
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
        from metalight.algorithms.policy_gradient import gaussian_log_prob

        old = (gaussian_log_prob(mean, std, query.actions), mean, std)

    def objective(weights: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        adapted = algorithm.adapt_on(algorithm.per_task(weights, 3), support, create_graph=create_graph)
        return algorithm.surrogate(adapted, query, query_advantage, old)[0].mean()

    second = torch.autograd.grad(objective(theta, True), list(theta.values()))
    first = torch.autograd.grad(objective(theta, False), list(theta.values()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta.items()}
        eps = 1e-6
        with torch.no_grad():
            plus = objective({k: v + eps * direction[k] for k, v in theta.items()}, False)
            minus = objective({k: v - eps * direction[k] for k, v in theta.items()}, False)
        numeric = float((plus - minus) / (2 * eps))
        analytic = sum(float((gr * direction[k]).sum()) for gr, k in zip(second, theta))
        first_order = sum(float((gr * direction[k]).sum()) for gr, k in zip(first, theta))
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


def test_maml_rl_learns_navigation_beyond_the_untrained_policy(compose_generated, tmp_path) -> None:
    """A few TRPO meta-steps raise the return after one inner step on the same 20 test goals, by a margin; TensorBoard gets the curves and trajectories."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metalight.visualization import read_scalars

    scores = {}
    for name, steps in (("trained", 8), ("untrained", 0)):
        cfg = compose_generated(
            *SMALL, f"trainer.max_steps={steps}", "data.batches_per_epoch=8", "data.meta_batch_size=5", "data.rollouts=5",
            f"logger={'tensorboard' if steps else 'csv'}", folder=name,
        )
        metrics, objects = train(cfg)
        assert objects["algorithm"].task_kind.name == REINFORCEMENT.name and objects["trainer"].global_step == steps
        scores[name] = [metrics[f"test/return_step{k}"] for k in range(4)]
        assert metrics["test/return"] == scores[name][-1] and math.isfinite(metrics["test/return_ci95"])
    trained, untrained = scores["trained"], scores["untrained"]
    assert trained[1] > untrained[1] + 10, (trained, untrained)
    run = tmp_path / "trained" / "run"
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "val_navigation/trajectories" in events.Tags()["images"]
    assert {f"val/return_step{k}" for k in range(4)} | {"train/return", "train/return_before", "train/trpo_kl"} <= set(read_scalars(run))


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(compose_generated, tmp_path, caplog) -> None:
    """Stopped after 2 of 4 meta-steps and restarted in its run folder (as a requeued job): the same weights bit for bit."""
    tiny = ["experiment=quick_navigation2d", "data.horizon=20", "data.meta_batch_size=4", "data.rollouts=4", "data.n_val_tasks=4",
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
    monkeypatch.delitem(sys.modules, "metalight.tasks.navigation")  # imported again, without gymnasium
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
        (["algo=maml"], "gives reinforcement tasks: choose algo=maml_rl"),
        (["data.env_options.goal_range=[0.5,-0.5]"], "data.env_options.goal_range=[0.5, -0.5] must be [low, high]"),
    ],
)
def test_bad_input_is_one_line_status_2_and_nothing_written(compose_generated, tmp_path, caplog, overrides, expected) -> None:
    """Through the entry point train.py wraps (cli.run_reporting_errors): one logged line, exit status 2, no run folder content."""
    cfg = compose_generated("experiment=quick_navigation2d", *overrides)
    assert_stops_with_one_line(cfg, caplog, tmp_path / "run", expected)
