"""RL² (algo=rl2): the hidden state carried through a trial and reset between tasks, the (a, r, d) inputs, the unroll
that training differentiates against the sampler's own steps and finite differences, a fast run, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from algo_tasks import assert_stops_with_one_line  # noqa: E402
from metalight.algorithms import RL2  # noqa: E402
from metalight.algorithms.rl.policy_gradient import Rollouts  # noqa: E402
from metalight.algorithms.model_based.rl2 import flatten_trials, trial_inputs  # noqa: E402
from metalight.errors import ConfigError  # noqa: E402
from metalight.models import GaussianGRU, GaussianMLP  # noqa: E402
from metalight.runs.training import train  # noqa: E402
from metalight.tasks import RLDataModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HORIZON, EPISODES = 6, 3


def _learner(dtype=torch.float32, hidden=8, **options) -> tuple[RL2, RLDataModule]:
    datamodule = RLDataModule(horizon=HORIZON, rollouts=2, meta_batch_size=2, seed=5)
    torch.manual_seed(0)
    algorithm = RL2(GaussianGRU(2, 2, hidden=hidden).to(dtype), episodes_per_trial=EPISODES, **options)
    algorithm.use_task_kind(datamodule.kind)
    return algorithm, datamodule


def _batch(datamodule: RLDataModule, indices, dtype=torch.float32) -> dict[str, torch.Tensor]:
    batch = datamodule.tasks("train")[[(0, i) for i in indices]]
    return {"tasks": batch["tasks"].to(dtype), "seeds": batch["seeds"]}


def _recorded_steps(algorithm: RL2, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every (inputs, state, mean) the sampler's actor passes through model.step, in order."""
    calls, step = [], algorithm.model.step

    def recording(inputs, state):
        mean, std, new_state = step(inputs, state)
        calls.append((inputs.clone(), state.clone(), mean.clone()))
        return mean, std, new_state

    monkeypatch.setattr(algorithm.model, "step", recording)
    return calls


def test_the_hidden_state_persists_across_the_episodes_of_a_trial_and_resets_between_tasks(monkeypatch) -> None:
    algorithm, datamodule = _learner()
    calls = _recorded_steps(algorithm, monkeypatch)
    trials, actor = algorithm.sample_trials(_batch(datamodule, [0, 1]), 2)
    assert trials.observations.shape == (2, 2, EPISODES, HORIZON, 2) and len(calls) == EPISODES * HORIZON
    assert torch.equal(calls[0][1], torch.zeros_like(calls[0][1])), "a trial starts from the zero state"
    for episode in range(1, EPISODES):
        state = calls[episode * HORIZON][1]
        assert state.abs().min() > 0, f"episode {episode + 1} starts from the state episode {episode} left, not from zero"
    # a new batch of tasks starts from zero again, whatever the last trial left
    calls.clear()
    algorithm.sample_trials(_batch(datamodule, [2, 3]), 2)
    assert actor.state.abs().min() > 0 and torch.equal(calls[0][1], torch.zeros_like(calls[0][1]))
    # what training unrolls is what the sampler stepped: episode 2's means depend on episode 1 (a reset per episode differs)
    flat = flatten_trials(trials)
    inputs, mask = trial_inputs(flat, HORIZON).unflatten(2, (EPISODES, HORIZON)), flat.mask.unflatten(2, (EPISODES, HORIZON))
    means = algorithm.model(inputs, mask)[0]
    alone = algorithm.model(inputs[:, :, 1:2], mask[:, :, 1:2])[0]  # episode 2 unrolled from a fresh state
    assert (means[:, :, 1] - alone[:, :, 0]).abs().max() > 1e-3


def test_training_unrolls_the_very_means_the_sampler_acted_on_even_after_an_early_end(monkeypatch) -> None:
    """The inputs the actor fed match trial_inputs, and the unroll reproduces every live step's mean, with episodes that end early."""
    algorithm, datamodule = _learner()
    calls = _recorded_steps(algorithm, monkeypatch)
    batch = _batch(datamodule, [0, 1])
    batch["tasks"] = torch.tensor([[0.3, 0.0], [0.3, -0.2]])  # the first goal 3 steps to the right, the second out of the way
    # heads right at full speed (0.1 a step), the state still moving the mean a little (1e-3): the first goal's episodes end after 3 steps
    monkeypatch.setattr(algorithm.model, "std", lambda: torch.full((2,), 1e-4))
    algorithm.model.mean.weight.data *= 1e-3
    algorithm.model.mean.bias.data = torch.tensor([1.0, 0.0])
    trials, _ = algorithm.sample_trials(batch, 2)
    flat = flatten_trials(trials)
    ended = flat.mask.unflatten(2, (EPISODES, HORIZON))[..., -1] == 0
    assert ended[0].any() and not ended[1].any(), "the first goal's episodes end early, the second's run out"
    fed = torch.stack([inputs for inputs, _, _ in calls], 2)  # [B, R, T, F]
    live = flat.mask.bool()
    assert torch.equal(fed[live], trial_inputs(flat, HORIZON)[live])
    sampled = torch.stack([mean for _, _, mean in calls], 2)
    unrolled = algorithm.model(trial_inputs(flat, HORIZON).unflatten(2, (EPISODES, HORIZON)), flat.mask.unflatten(2, (EPISODES, HORIZON)))[0]
    torch.testing.assert_close(unrolled.flatten(2, 3)[live], sampled[live], rtol=0, atol=1e-6)


def test_previous_action_reward_and_done_are_those_of_the_last_live_step_and_zero_at_trial_start() -> None:
    """By hand: 2 episodes of 3 steps, the first ending after its second step."""
    observations = torch.arange(6.0).view(1, 1, 6, 1)
    actions = 10 + torch.arange(6.0).view(1, 1, 6, 1)
    rewards = -torch.arange(1.0, 7.0).view(1, 1, 6)
    mask = torch.tensor([[[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]])
    inputs = trial_inputs(Rollouts(observations, actions, rewards * mask, mask), horizon=3)[0, 0]
    expected = torch.tensor([
        # o, a_{t-1}, r_{t-1}, d_t
        [0.0, 0.0, 0.0, 0.0],  # trial start: zeros
        [1.0, 10.0, -1.0, 0.0],
        [2.0, 11.0, -2.0, 0.0],  # (dead: the episode ended)
        [3.0, 11.0, -2.0, 1.0],  # episode 2: episode 1's last live step, done
        [4.0, 13.0, -4.0, 0.0],
        [5.0, 14.0, -5.0, 0.0],
    ])
    assert torch.equal(inputs, expected)


def test_gradients_flow_through_the_whole_trial_and_match_finite_differences() -> None:
    algorithm, datamodule = _learner(torch.float64)
    trials, _ = algorithm.sample_trials(_batch(datamodule, [0, 1], torch.float64), 2)
    flat = flatten_trials(trials)
    # the last step's mean depends on the first step's inputs, two episode boundaries away
    inputs = trial_inputs(flat, HORIZON).unflatten(2, (EPISODES, HORIZON)).requires_grad_()
    means, _ = algorithm.model(inputs, flat.mask.unflatten(2, (EPISODES, HORIZON)))
    (grad,) = torch.autograd.grad(means[..., -1, -1, :].sum(), inputs)
    assert grad[..., 0, 0, :].abs().sum() > 0
    # d/d theta of the log-likelihood of the whole trials, along a random direction, against central differences
    params = [p for p in algorithm.model.parameters()]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(torch.autograd.grad(algorithm.log_likelihoods(flat).sum(), params), direction))
    eps, values = 1e-6, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(algorithm.log_likelihoods(flat).sum())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    torch.testing.assert_close(analytic, (values[0] - values[1]) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_a_meta_steps_gradient_is_the_policy_gradient_of_whole_trials_with_advantages_across_episodes() -> None:
    """At the weights that sampled, PPO's first epoch is -mean(log pi * A) of the whole trials, A = GAE discounted across the episodes' boundaries."""
    from metalight.algorithms.rl.policy_gradient import advantages, discounted_returns

    algorithm, datamodule = _learner(torch.float64, epochs=1)
    algorithm.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)  # no Trainer: a plain backward
    batch = _batch(datamodule, [0, 1], torch.float64)
    outcome = algorithm.compute_meta_gradient(batch, measure=True)
    got = [p.grad.clone() for p in algorithm.model.parameters()]
    # by hand, from the same trials (sampling is a function of the tasks' seeds)
    flat = flatten_trials(algorithm.sample_trials(batch, 2)[0])
    advantage = advantages(flat, 0.99, 1.0)
    expected = torch.autograd.grad(-(algorithm.log_likelihoods(flat) * advantage).mean(dim=(1, 2)).mean(), list(algorithm.model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the trial is one discounted sequence: an episode's last step counts the next episode's rewards
    returns = discounted_returns(flat.rewards, flat.mask, 0.99)
    assert (returns[..., HORIZON - 1] - flat.rewards[..., HORIZON - 1]).abs().min() > 0
    # scores: each episode's return, averaged over the task's trials
    torch.testing.assert_close(outcome.scores, flat.rewards.unflatten(2, (EPISODES, HORIZON)).sum(-1).mean(1))
    assert outcome.scores.shape == (2, EPISODES) and algorithm.eval_steps == EPISODES - 1 and algorithm.adapts


def test_the_navigation_figure_draws_the_episodes_of_a_trial() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from metalight.visualization import adapted_trajectories, plot_trajectories

    algorithm, datamodule = _learner()
    trajectories = adapted_trajectories(algorithm, datamodule, [0, 1])
    assert trajectories["observations"].shape == (2, EPISODES, datamodule.eval_rollouts, HORIZON, 2) and trajectories["within_trial"]
    figure = plot_trajectories(trajectories, steps=(0, 1, 2))
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert any(label.startswith("episode 1 (") for label in labels) and any(label.startswith("episode 3 (") for label in labels), labels


def test_fast_dev_run_logs_the_return_of_every_episode(compose_generated) -> None:
    cfg = compose_generated(
        "experiment=quick_navigation2d_rl2", "debug=fast_dev_run", "logger=csv", "data.horizon=10", "data.meta_batch_size=2", "data.rollouts=2",
        "data.eval_rollouts=2", "data.eval_batch_size=2", "model.hidden=8", "callbacks.navigation_trajectories=null",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert {f"test/return_step{k}" for k in range(3)} <= set(metrics) and metrics["test/return"] == metrics["test/return_step2"]


def test_bad_settings_are_refused() -> None:
    from metalight.algorithms import TRPO

    with pytest.raises(ConfigError, match="algo.episodes_per_trial=0 is not valid"):
        RL2(GaussianGRU(), episodes_per_trial=0)
    with pytest.raises(ConfigError, match="not TRPO: use algo=maml_rl"):
        RL2(GaussianGRU(), optimizer=TRPO)
    with pytest.raises(ConfigError, match="algo.gamma=2 is not valid"):
        RL2(GaussianGRU(), gamma=2)
    with pytest.raises(ConfigError, match="needs a recurrent Gaussian policy .* but GaussianMLP is none: use model=gaussian_gru"):
        RL2(GaussianMLP(2, 2)).use_task_kind(RLDataModule().kind)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data=sinusoid"], "gives regression tasks"),
        (["model=gaussian_mlp"], "needs a recurrent Gaussian policy (step, initial_state) whose state carries a trial, but GaussianMLP is none: use model=gaussian_gru"),
        (["model.in_features=4"], "the policy has model.in_features=4 but data.env=navigation2d needs 2: set model.in_features=2"),
        (["algo.clip=0"], "algo.clip=0 is not valid"),
        # the quick protocol's GRU width given to an MLP policy
        (["experiment=quick_navigation2d_rl2", "model=gaussian_mlp"], "model.hidden=32 must be a list of layer widths"),
    ],
)
def test_bad_input_is_one_line_status_2_and_nothing_written(compose_generated, tmp_path, caplog, overrides, expected) -> None:
    cfg = compose_generated("experiment=navigation2d_rl2", *overrides)
    assert_stops_with_one_line(cfg, caplog, tmp_path / "run", expected)
