"""GrBAL's pieces (#32): dynamics tasks cut from collected episodes, the dynamics model's normalization, online adaptation
equal to an explicit SGD step on the last M transitions, the collect-and-fit loop (iteration e collected once, before
epoch e's first batch, random at iteration 0), the controller's paired evaluation, and bad input in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("mujoco")

from metalight.algorithms import MAML  # noqa: E402
from metalight.control.mpc import Episodes, LearnedModel  # noqa: E402
from metalight.errors import ConfigError  # noqa: E402
from metalight.models import DynamicsMLP  # noqa: E402
from metalight.tasks.dynamics import DynamicsDataModule, EpisodeBuffer, TransitionSegments  # noqa: E402
from metalight.tasks.kinds import REGRESSION  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    env="halfcheetah_cripple", env_options={"frame_skip": 1, "convention": "rllab"}, episode_length=12, rollouts=2, past=3, future=2,
    planner={"candidates": 6, "horizon": 2}, random_episodes=1, val_episodes=1, test_episodes=2, meta_batch_size=2,
    eval_batch_size=2, batches_per_epoch=2, n_val_tasks=2, n_test_tasks=2, seed=3,
)


def episodes(n: int = 2, steps: int = 10, seed: int = 0) -> Episodes:
    """Random episodes with 20-D observations and 6-D actions."""
    g = torch.Generator().manual_seed(seed)
    return Episodes(torch.randn(n, steps + 1, 20, generator=g), torch.rand(n, steps, 6, generator=g) * 2 - 1, torch.randn(n, steps, generator=g))


def test_a_task_is_the_next_transitions_of_one_episode_in_the_models_units():
    buffer = EpisodeBuffer()
    buffer.add(episodes())
    model = DynamicsMLP(20, 6, hidden=[8])
    block = buffer.blocks[0]
    model.set_normalization(torch.cat([block.observations[:, :-1], block.actions], -1).flatten(0, 1), (block.observations[:, 1:] - block.observations[:, :-1]).flatten(0, 1))
    segments = TransitionSegments(lambda epoch: buffer, lambda: model, "train", 5, past=3, future=2)
    batch = segments[[(0, 0), (0, 1)]]
    assert batch["support_x"].shape == (2, 3, 26) and batch["query_x"].shape == (2, 2, 26) and batch["query_y"].shape == (2, 2, 20)
    x = torch.cat([batch["support_x"], batch["query_x"]], 1)
    y = torch.cat([batch["support_y"], batch["query_y"]], 1)
    for task in range(2):
        observations = x[task, :, :20]
        # consecutive: each row's next observation (from its target) is the following row's observation
        following = model.next_observation(observations, y[task])
        torch.testing.assert_close(following[:-1], observations[1:])
        # and they are rows of the buffer, in order
        start = next(
            (e, t) for e in range(2) for t in range(10) if torch.equal(block.observations[e, t], observations[0]) and torch.equal(block.actions[e, t], x[task, 0, 20:])
        )
        e, t = start
        torch.testing.assert_close(x[task, :, 20:], block.actions[e, t : t + 5])
    assert torch.equal(segments[[(0, 1)]]["query_y"][0], batch["query_y"][1])  # a pure function of (seed, split, epoch, index)


def test_the_normalization_round_trips_and_standardizes():
    model = DynamicsMLP(3, 1, hidden=[4])
    inputs, deltas = torch.randn(50, 4) * 5 + 2, torch.randn(50, 3) * 0.1 - 1
    model.set_normalization(inputs, deltas)
    observations, following = torch.randn(7, 3), torch.randn(7, 3)
    torch.testing.assert_close(model.next_observation(observations, model.normalized_delta(observations, following)), following)
    normalized = (deltas - model.delta_mean) / model.delta_std
    torch.testing.assert_close(normalized.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.std(0, correction=0), torch.ones(3))
    assert {name for name, _ in model.named_parameters()}.isdisjoint({"input_mean", "input_std", "delta_mean", "delta_std"})


def test_online_adaptation_is_one_sgd_step_on_the_last_m_transitions():
    torch.manual_seed(0)
    model = DynamicsMLP(20, 6, hidden=[8], init="default").double()
    learner = MAML(model, inner_lr=0.3, inner_steps=1, eval_inner_steps=1)
    learner.use_task_kind(REGRESSION)
    data = episodes(n=2, steps=9, seed=1)
    observations, actions = data.observations.double(), data.actions.double()
    fixed = dict(model.named_buffers())
    weights = {k: v.detach() for k, v in model.named_parameters()}
    predict = lambda w, x: torch.func.vmap(lambda we, xe: functional_call(model, (we, fixed), (xe,)))(w, x)  # noqa: E731
    learned = LearnedModel(weights, predict, model.next_observation, model.normalized_delta, learner.weights_adapted_to)
    past = 4
    # not yet past + 1 observations: the meta-weights
    early = learned.weights_for(observations[:, :5], actions[:, :4], past)
    assert all(torch.equal(early[k][e], weights[k]) for k in weights for e in range(2))
    adapted = learned.weights_for(observations, actions, past)
    for e in range(2):
        window = slice(9 - past, 9)
        x = torch.cat([observations[e, window], actions[e, window]], -1)
        y = model.normalized_delta(observations[e, window], observations[e, 6:10])
        w = {k: v.clone().requires_grad_() for k, v in weights.items()}
        loss = (functional_call(model, (w, fixed), (x,)) - y).pow(2).mean()
        grads = torch.autograd.grad(loss, list(w.values()))
        for (k, v), g in zip(w.items(), grads):
            torch.testing.assert_close(adapted[k][e], v.detach() - 0.3 * g, rtol=0, atol=1e-12)


def attach(datamodule: DynamicsDataModule, learner: MAML) -> None:
    """A stand-in for the Trainer: what the data module reads of it."""

    class Stub:
        lightning_module = learner
        global_rank, world_size = 0, 1

    datamodule.trainer = Stub()


def test_each_iteration_is_collected_once_before_its_epoch_random_first():
    datamodule = DynamicsDataModule(**TINY)
    torch.manual_seed(0)
    learner = MAML(DynamicsMLP(20, 6, hidden=[8]), inner_lr=0.01, inner_steps=1, eval_inner_steps=1)
    attach(datamodule, learner)
    datamodule.setup("fit")
    train = datamodule._datasets["train"]
    train[[(0, 0), (0, 1)]]
    assert datamodule.buffer.iterations == 1
    random_actions = datamodule.buffer.blocks[0].actions
    train[[(0, 2)]]
    assert datamodule.buffer.iterations == 1  # not again
    assert learner.model.delta_std.ne(1).any()  # the statistics follow the collection
    train[[(2, 0)]]
    assert datamodule.buffer.iterations == 3  # iterations 1 and 2 in order
    # iteration 0 is uniform random actions; later iterations plan (the planner's first action of a sequence)
    assert random_actions.abs().max() <= 1 and not torch.equal(random_actions, datamodule.buffer.blocks[1].actions)
    # the same seed collects the same episodes
    again = DynamicsDataModule(**TINY)
    torch.manual_seed(0)
    attach(again, MAML(DynamicsMLP(20, 6, hidden=[8]), inner_lr=0.01, inner_steps=1, eval_inner_steps=1))
    again.setup("fit")
    again._datasets["train"][[(2, 0)]]
    for mine, theirs in zip(datamodule.buffer.blocks, again.buffer.blocks):
        assert torch.equal(mine.observations, theirs.observations) and torch.equal(mine.actions, theirs.actions)
    state = datamodule.state_dict()
    restored = DynamicsDataModule(**TINY)
    restored.load_state_dict(state)
    assert restored.buffer.iterations == 3 and torch.equal(restored.buffer.blocks[2].rewards, datamodule.buffer.blocks[2].rewards)


def test_training_bodies_never_include_the_held_out_joint():
    datamodule = DynamicsDataModule(**TINY)
    train = datamodule.bodies("train")[[(e, i) for e in range(5) for i in range(5)]]["tasks"]
    test = datamodule.bodies("test")[[(0, i) for i in range(5)]]["tasks"]
    assert set(train[:, 0].tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and set(test[:, 0].tolist()) == {0.0}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"planner": {"horizon": 0}}, "data.planner.horizon=0"),
        ({"planner": {"candidates": 0}}, "data.planner.candidates=0"),
        ({"env": "navigation2d", "env_options": {}}, "no reward function"),
        ({"past": 10, "future": 5}, "data.past + data.future = 15"),
        ({"num_workers": 2}, "data.num_workers=2"),
        ({"observation_dim": 17}, "data.observation_dim=17"),
    ],
)
def test_bad_settings_are_one_line(change, expected):
    with pytest.raises(ConfigError, match=expected.replace("+", r"\+").replace(".", r"\.")):
        DynamicsDataModule(**(TINY | change))


def test_the_learner_must_learn_a_dynamics_model():
    from metalight.models import MLP

    datamodule = DynamicsDataModule(**TINY)
    attach(datamodule, MAML(MLP(26, 20, hidden=[8]), inner_lr=0.01))
    with pytest.raises(ConfigError, match="model=dynamics_mlp"):
        datamodule.learner()


def test_the_point_robot_moves_by_its_mount_and_gain():
    from metalight.envs.point_robot import PointRobot

    env = PointRobot(2, goal=(0.5, 0.5))
    bodies = torch.tensor([[np.pi / 2, 0.5], [0.0, 1.5]])
    start, _ = env.reset(options={"tasks": bodies})
    assert torch.equal(start, torch.zeros(2, 2))
    following, reward, terminated, truncated, _ = env.step(torch.tensor([[0.1, 0.0], [0.1, 0.0]]))
    # turned by 90 degrees at half gain: a push along x moves it along y by 0.05; the other body 0.15, clipped to 0.1
    torch.testing.assert_close(following, torch.tensor([[0.0, 0.05], [0.1, 0.0]]))
    torch.testing.assert_close(reward, -torch.linalg.vector_norm(following - torch.tensor([0.5, 0.5]), dim=-1))
    torch.testing.assert_close(env.reward(start, torch.zeros(2, 2), following), reward)
    assert not terminated.any() and not truncated.any()


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"gain_range": [1.0, 0.5]}, "gain_range"), ({"gain_range": [-1.0, 1.0]}, "gain_range"), ({"max_angle": -1}, "max_angle"), ({"goal": [1]}, "goal")],
)
def test_bad_point_robot_bodies_are_one_line(options, expected):
    with pytest.raises(ConfigError, match=f"data.env_options.{expected}"):
        DynamicsDataModule(**(TINY | {"env": "point_robot", "env_options": options, "observation_dim": 2, "action_dim": 2}))


def test_a_learner_without_a_dynamics_model_stops_before_training(compose_generated):
    from metalight.runs.training import build_data_and_algorithm

    with pytest.raises(ConfigError, match="model=dynamics_mlp"):
        build_data_and_algorithm(compose_generated("experiment=quick_grbal", "algo=cnp", "~model.hidden"))


@pytest.mark.slow
def test_online_adaptation_beats_the_same_model_unadapted_on_held_out_bodies(compose_train):
    """A short quick_grbal (3 iterations, about 25 s): on 16 held-out point-robot bodies the adapted controller beats the
    same model not adapted, by more than the paired interval, and a random policy (an inner step of 1e-6: gap 0.0, fails)."""
    from metalight.runs.training import train

    cfg = compose_train(
        "experiment=quick_grbal", "trainer.max_epochs=3", "data.batches_per_epoch=40", "data.rollouts=6", "data.val_episodes=2",
        "data.test_episodes=16", "data.n_val_tasks=10", "data.n_test_tasks=10", "logger=csv", "trainer.accelerator=cpu",
    )
    _, objects = train(cfg)
    results = objects["algorithm"].test_results
    assert results["adaptation_gain"] - results["adaptation_gain_ci95"] > 0, results
    assert results["return"] > results["return_random"] + 10, results
