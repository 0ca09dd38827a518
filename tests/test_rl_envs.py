"""MuJoCo meta-RL tasks (data=halfcheetah_dir / halfcheetah_vel, data=metaworld_ml1; ML10: test_metaworld_ml10.py): rewards by hand, task draws, Meta-World goals and success, errors, one run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
pytest.importorskip("mujoco", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.errors import ConfigError  # noqa: E402
from metalight.runs.training import train  # noqa: E402
from metalight.envs.halfcheetah import HalfCheetahDirection, HalfCheetahVelocity  # noqa: E402
from metalight.algorithms.rl.policy_gradient import sample_rollouts  # noqa: E402
from metalight.tasks.rl import RLDataModule  # noqa: E402


def hand_rewards(env, actions: np.ndarray, family: str, goals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step every simulator of env by hand (MuJoCo's x before and after, dt) and return (rewards, observations) as the references define them."""
    rewards, observations = [], []
    for sim, action, goal in zip(env.sims, actions, goals):
        clipped = np.clip(action, -1.0, 1.0)
        before = float(sim.data.qpos[0])
        sim.do_simulation(clipped, sim.frame_skip)
        velocity = (float(sim.data.qpos[0]) - before) / sim.dt
        control = 0.5 * 0.1 * float(np.sum(clipped**2))
        rewards.append((goal * velocity if family == "direction" else -abs(velocity - goal)) - control)
        observations.append(np.concatenate([sim.data.qpos[1:], sim.data.qvel, sim.data.body("torso").xpos]))
    return np.array(rewards), np.stack(observations)


@pytest.mark.parametrize("cls, goals", [(HalfCheetahDirection, [1.0, -1.0, 1.0]), (HalfCheetahVelocity, [0.0, 1.3, 2.0])])
def test_halfcheetah_rewards_equal_a_hand_computation_from_the_simulator(cls, goals) -> None:
    """The vector environment's rewards and observations equal the references' formulas on the same simulator states (a twin environment stepped by hand)."""
    tasks = torch.tensor(goals).view(3, 1)
    actions = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0)) * 1.5  # some beyond [-1, 1]: clipped, and the cost is on the clipped action
    env = cls(3, horizon=4)
    observation, _ = env.reset(options={"tasks": tasks})
    start = [(sim.data.qpos.copy(), sim.data.qvel.copy()) for sim in env.sims]
    got = []
    for t in range(4):
        observation, reward, terminated, truncated, info = env.step(actions[t])
        got.append((reward, observation))
        assert not terminated.any() and truncated.all() == (t == 3), "never terminates; the horizon (4) truncates"
    # replay by hand from the same start states on the same simulators
    for sim, (qpos, qvel) in zip(env.sims, start):
        sim.set_state(qpos, qvel)
    for t in range(4):
        rewards, observations = hand_rewards(env, actions[t].double().numpy(), cls.family, np.array(goals))
        assert np.allclose(got[t][0].numpy(), rewards, rtol=1e-5, atol=1e-5), (t, got[t][0], rewards)
        assert np.allclose(got[t][1].numpy(), observations, rtol=1e-5, atol=1e-5)
    assert observation.shape == (3, 20) and env.observation_dim == 20 and env.action_dim == 6


def test_halfcheetah_start_states_come_from_each_copys_seed() -> None:
    """The same seeds replay the same noisy start states whatever the task; copies of one task with other seeds start elsewhere."""
    first, _ = HalfCheetahDirection(2).reset(seed=[3, 4], options={"tasks": torch.tensor([[1.0], [1.0]])})
    again, _ = HalfCheetahDirection(2).reset(seed=[3, 4], options={"tasks": torch.tensor([[-1.0], [1.0]])})
    other, _ = HalfCheetahDirection(2).reset(seed=[5, 4], options={"tasks": torch.tensor([[1.0], [1.0]])})
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


def test_sampled_tasks_start_from_fresh_states_the_same_in_each_phase() -> None:
    """The sampler's reset seeds: every task x rollout its own start state (the references draw fresh noise at each
    reset), the same before and after an adaptation step (a task's phases), other ones for a task of another seed."""
    env = RLDataModule(env="halfcheetah_dir", horizon=1, rollouts=2).environment
    tasks, still = torch.tensor([[1.0], [1.0]]), lambda observations: (torch.zeros(*observations.shape[:-1], 6), torch.full((6,), 1e-9))
    starts = [sample_rollouts(env, still, tasks, seeds, phase, 2).observations[:, :, 0] for seeds, phase in
              ((torch.tensor([7, 8]), 0), (torch.tensor([7, 8]), 1), (torch.tensor([9, 8]), 0))]
    flat = starts[0].reshape(4, -1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(4) for j in range(i))  # 2 tasks of one direction x 2 rollouts
    assert torch.equal(starts[0], starts[1])  # phases 0 and 1 of the same tasks
    assert not torch.equal(starts[0][0], starts[2][0]) and torch.equal(starts[0][1], starts[2][1])


@pytest.mark.parametrize("frame_skip", [1, 2])
def test_halfcheetah_takes_frame_skip_mujoco_steps_per_action_and_its_velocity_is_per_second(frame_skip) -> None:
    """A step is frame_skip MuJoCo steps of 0.01 s with the clipped action (a plain MjData stepped by mj_step from the same
    state), and the gymnasium convention's velocity is the root's displacement over that time (frame_skip x 0.01 s)."""
    import mujoco

    env = HalfCheetahDirection(2, frame_skip=frame_skip, convention="gymnasium")
    env.reset(seed=[0, 1], options={"tasks": torch.tensor([[1.0], [-1.0]])})
    before, action = env.states.copy(), torch.tensor([[0.5, -2.0, 0.3, 1.5, -0.7, 0.1], [1.0, 0.2, -0.4, 0.9, 0.0, -3.0]])
    _, reward, *_, info = env.step(action)
    assert env.dt == pytest.approx(0.01 * frame_skip) and env.model.opt.timestep == pytest.approx(0.01)
    data = mujoco.MjData(env.model)
    for i in range(2):
        mujoco.mj_setState(env.model, data, before[i], env.state_spec)
        data.ctrl[:] = np.clip(action[i].double().numpy(), -1, 1)
        for _ in range(frame_skip):
            mujoco.mj_step(env.model, data)
        assert np.allclose(data.qpos, env.states[i, env.qpos], atol=1e-10) and np.allclose(data.qvel, env.states[i, env.qvel], atol=1e-10)
        assert info["x_velocity"][i] == pytest.approx((data.qpos[0] - before[i, env.qpos][0]) / (0.01 * frame_skip), rel=1e-9)
    control = 0.05 * (action.clamp(-1, 1).double() ** 2).sum(-1)
    assert np.allclose(reward.double().numpy(), np.array([1.0, -1.0]) * info["x_velocity"] - control.numpy(), atol=1e-5)


def start_states(convention: str) -> np.ndarray:
    """qpos and qvel [200, 17] of 200 start states of the convention (8 copies x 25 seeds)."""
    env = HalfCheetahDirection(8, convention=convention)
    states = []
    for first in range(0, 200, 8):
        env.reset(seed=first, options={"tasks": torch.ones(8, 1)})
        states.append(np.concatenate([env.states[:, env.qpos], env.states[:, env.qvel]], 1))
    return np.concatenate(states)


def test_start_noise_is_rllabs_normal_or_gymnasiums_uniform() -> None:
    """rllab (Finn et al.): qpos0 + N(0, 0.01), qvel N(0, 0.1); gymnasium (HalfCheetah-v5): qpos0 + U(-0.1, 0.1), qvel N(0, 0.1)."""
    rllab, gym = start_states("rllab"), start_states("gymnasium")  # qpos0 is 0 for every joint of the cheetah
    assert 0.009 < rllab[:, :9].std() < 0.011 and 0.09 < rllab[:, 9:].std() < 0.11
    assert abs(gym[:, :9]).max() <= 0.1 and 0.054 < gym[:, :9].std() < 0.061 and 0.09 < gym[:, 9:].std() < 0.11  # 0.1 / sqrt(3)


def test_rllab_convention_observes_and_rewards_the_centre_of_mass_after_the_step() -> None:
    """Under convention=rllab the observation's last 3 numbers are the cheetah's centre of mass (sum of body masses x body
    centres / total mass) and the velocity the mass-weighted mean of the bodies' linear velocities (rllab's
    _compute_subtree over mj_objectVelocity), both of the state after the step; the direction reward is that velocity."""
    import mujoco

    env = HalfCheetahDirection(2, frame_skip=1, convention="rllab")
    observation, _ = env.reset(seed=[4, 5], options={"tasks": torch.tensor([[1.0], [-1.0]])})
    model, data, mass = env.model, mujoco.MjData(env.model), env.model.body_mass
    for t in range(3):
        if t:
            observation, reward, *_, info = env.step(torch.full((2, 6), 0.8))
        for i in range(2):
            mujoco.mj_setState(model, data, env.states[i], env.state_spec)
            mujoco.mj_forward(model, data)
            centre = (mass[:, None] * data.xipos).sum(0) / mass.sum()
            velocities = np.zeros((model.nbody, 6))
            for body in range(model.nbody):
                mujoco.mj_objectVelocity(model, data, mujoco.mjtObj.mjOBJ_BODY, body, velocities[body], 0)
            momentum = (mass[:, None] * velocities[:, 3:]).sum(0) / mass.sum()
            assert np.allclose(observation[i, -3:].double().numpy(), centre, atol=1e-6)
            if t:
                assert info["x_velocity"][i] == pytest.approx(momentum[0], abs=1e-9)
                assert float(reward[i]) == pytest.approx((1.0 if i == 0 else -1.0) * momentum[0] - 0.05 * 6 * 0.64, abs=1e-5)
    assert not np.allclose(observation[:, -3:].numpy(), env.states[:, env.qpos][:, [0, 1, 1]]), "not the torso body's position"


def test_linear_baseline_features_clip_observations_at_10_as_rllab() -> None:
    from metalight.algorithms.rl.policy_gradient import baseline_features

    observations = torch.tensor([[[-25.0, 3.0], [12.0, -10.0]]])
    features = baseline_features(observations, torch.ones(1, 2))
    assert features[0, :, :2].tolist() == [[-10.0, 3.0], [10.0, -10.0]] and features[0, :, 2:4].tolist() == [[100.0, 9.0], [100.0, 100.0]]


def test_finn_protocols_run_at_the_authors_rate_and_halve_the_later_evaluation_steps(compose_generated) -> None:
    """Every Finn et al. RL protocol tests with 0.1 then 0.05 (A.2); the HalfCheetah ones run rllab's physics (1 step of 0.01 s)."""
    for experiment in ("halfcheetah_dir", "halfcheetah_vel", "navigation2d_finn", "metaworld_ml1_reach"):
        cfg = compose_generated(f"experiment={experiment}", folder=experiment)
        assert cfg.algo.inner_lr == 0.1 and cfg.algo.eval_inner_lr is None and cfg.algo.eval_inner_lr_later == 0.05, experiment
        if experiment.startswith("halfcheetah"):
            options = cfg.data.env_options
            assert options.frame_skip == 1 and options.convention == "rllab" and cfg.data.horizon == 200, experiment
    assert compose_generated("experiment=halfcheetah_vel", folder="vel").data.env_options.velocity_range == [0.0, 2.0]


def datamodule(env: str, **options) -> RLDataModule:
    module = RLDataModule(env=env, horizon=10, rollouts=2, meta_batch_size=2, n_val_tasks=2, n_test_tasks=2, **options)
    module.setup()
    return module


def test_tasks_are_drawn_as_the_references_draw_them() -> None:
    """Directions: +1 or -1, each with probability 1/2; target velocities uniform in [0, 2]."""
    keys = [(e, i) for e in range(20) for i in range(50)]
    directions = datamodule("halfcheetah_dir").tasks("train")[keys]["tasks"][:, 0]
    assert set(directions.tolist()) == {-1.0, 1.0} and abs(float((directions > 0).double().mean()) - 0.5) < 0.05
    velocities = datamodule("halfcheetah_vel").tasks("train")[keys]["tasks"][:, 0].double()
    assert velocities.min() >= 0 and velocities.max() <= 2 and velocities.min() < 0.01 and velocities.max() > 1.99
    assert abs(float(velocities.mean()) - 1.0) < 0.05 and abs(float(velocities.var()) - 4 / 12) < 0.03, "uniform on [0, 2]: mean 1, variance 1/3"
    narrow = datamodule("halfcheetah_vel", env_options={"velocity_range": [0.5, 0.6]}).tasks("train")[keys[:100]]["tasks"]
    assert narrow.min() >= 0.5 and narrow.max() <= 0.6


def test_bad_options_and_a_missing_package_are_one_line_errors(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"velocity_range"):
        datamodule("halfcheetah_vel", env_options={"velocity_range": [2, 0]})
    with pytest.raises(ConfigError, match=r"not options of data.env=halfcheetah_dir"):
        datamodule("halfcheetah_dir", env_options={"goal_range": [0, 1]})
    monkeypatch.setitem(__import__("sys").modules, "mujoco", None)  # `import mujoco` now fails as if it were not installed
    with pytest.raises(ConfigError) as error:
        datamodule("halfcheetah_dir")
    assert "mujoco" in str(error.value) and "pip install -e '.[rl]'" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setitem(__import__("sys").modules, "metaworld", None)
    with pytest.raises(ConfigError) as error:
        datamodule("metaworld")
    assert "metaworld" in str(error.value) and "pip install -e '.[rl]'" in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def reach():
    """ML1 reach's data module (its benchmark is built once: about 2 s)."""
    pytest.importorskip("metaworld", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
    from metalight.tasks.meta_world import MetaWorldDataModule

    module = MetaWorldDataModule(env_options={"task": "reach"}, horizon=60, rollouts=1, meta_batch_size=2, n_val_tasks=2, n_test_tasks=2)
    module.setup()
    return module


def test_metaworld_tests_each_ml1_test_goal_once_and_validates_on_held_out_training_goals(reach) -> None:
    """The test scores ML1's 50 test goals (50-99) once each, in order; validation the last 10 training goals (40-49), once
    each, which meta-training never draws; no goal is both validated and tested."""
    import metaworld

    from metalight.tasks.meta_world import MetaWorldDataModule

    module = MetaWorldDataModule(env_options={"task": "reach"}, horizon=10, rollouts=1, meta_batch_size=20, n_val_tasks=10, n_test_tasks=50, eval_batch_size=16)
    module.setup()
    scored = {part: [int(g) for batch in loader for g in batch["tasks"][:, 0].tolist()] for part, loader in (("val", module.val_dataloader()), ("test", module.test_dataloader()))}
    assert scored["test"] == list(range(50, 100)) and scored["val"] == list(range(40, 50))
    train = module.tasks("train")[[(e, i) for e in range(10) for i in range(20)]]["tasks"][:, 0]
    assert train.min() >= 0 and train.max() <= 39 and len(set(train.tolist())) > 35
    seeds = module.tasks("test")[[(0, i) for i in range(50)]]["seeds"]
    assert len(set(seeds.tolist())) == 50 and torch.equal(seeds, module.tasks("test")[[(0, i) for i in range(50)]]["seeds"]), "each goal its own fixed noise"
    for bad, key in (({"n_val_tasks": 50}, "n_val_tasks"), ({"n_test_tasks": 51}, "n_test_tasks")):
        with pytest.raises(ConfigError, match=key):
            MetaWorldDataModule(env_options={"task": "reach"}, horizon=10, **bad)
    ml1 = metaworld.ML1("reach-v3", seed=0)
    env = reach.environment.make(2)
    assert np.allclose(env.goal(3), np.asarray(__import__("pickle").loads(ml1.train_tasks[3].data)["rand_vec"][-3:]))
    assert np.allclose(env.goal(57), np.asarray(__import__("pickle").loads(ml1.test_tasks[7].data)["rand_vec"][-3:]))


def test_metaworld_resets_to_the_tasks_goal_and_reports_success_as_0_or_1(reach) -> None:
    """Each arm's target is its task's goal; a hand driven to the goal succeeds (info 1, episode_success), one held still does not."""
    env = reach.environment.make(2)
    observation, _ = env.reset(options={"tasks": torch.tensor([[3.0], [57.0]])})
    for sim, number in zip(env.sims, (3, 57)):
        assert np.allclose(sim._target_pos, env.goal(number))
    assert observation.shape == (2, 39) and torch.equal(observation[:, 36:], torch.zeros(2, 3)), "ML1 hides the goal"
    successes = []
    for _ in range(60):
        hand = observation[:, :3].double().numpy()
        action = np.zeros((2, 4))
        action[0, :3] = np.clip((env.goal(3) - hand[0]) * 10, -1, 1)  # arm 0 reaches for its goal, arm 1 stays
        observation, reward, terminated, truncated, info = env.step(torch.from_numpy(action).float())
        assert set(np.unique(info["success"]).tolist()) <= {0.0, 1.0}
        successes.append(info["success"])
    successes = np.stack(successes)
    assert successes[:, 0].max() == 1.0 and successes[:, 1].max() == 0.0
    assert env.episode_success.tolist() == [True, False] and truncated.all(), "60 steps: the horizon"


def test_unknown_metaworld_task_is_a_config_error_listing_the_known_ones(reach) -> None:
    from metalight.tasks.meta_world import MetaWorldDataModule

    with pytest.raises(ConfigError) as error:
        MetaWorldDataModule(env_options={"task": "fly-to-the-moon"})
    message = str(error.value)
    assert "\n" not in message and "fly-to-the-moon" in message and all(name in message for name in ("reach", "push", "pick-place"))


def test_halfcheetah_dir_trains_end_to_end(compose_generated) -> None:
    """train.py on the composed experiment=halfcheetah_dir: 2 meta-steps of 2 tasks x 2 rollouts of 10 steps, then the test."""
    cfg = compose_generated(
        "experiment=halfcheetah_dir", "trainer.max_steps=2", "data.meta_batch_size=2", "data.rollouts=2", "data.horizon=10",
        "data.n_val_tasks=2", "data.n_test_tasks=2", "data.eval_batch_size=2", "data.batches_per_epoch=2", "logger=csv",
    )
    assert cfg.model.in_features == 20 and cfg.model.out_features == 6 and cfg.data.env == "halfcheetah_dir"
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    assert all(math.isfinite(metrics[f"test/return_step{k}"]) for k in range(4))


def test_metaworld_reach_logs_success_beside_return(compose_generated, reach, tmp_path) -> None:
    """train.py on experiment=metaworld_ml1_reach (1 meta-step, 2 tasks x 1 rollout of 20 steps): val/ and test/success after each inner step, in [0, 1]."""
    import csv

    cfg = compose_generated(
        "experiment=metaworld_ml1_reach", "trainer.max_steps=1", "data.meta_batch_size=2", "data.rollouts=1", "data.horizon=20",
        "data.n_val_tasks=2", "data.n_test_tasks=2", "data.eval_batch_size=2", "data.batches_per_epoch=1", "algo.eval_inner_steps=1", "logger=csv",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and objects["algorithm"].environment.make.__name__ != "make", "the learner has its environment back"
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = {key: float(row[key]) for row in rows for key in row if "success" in key and row[key]}
    assert {f"{stage}/success{tail}" for stage in ("val", "test") for tail in ("", "_step0", "_step1")} <= set(logged)
    assert all(0.0 <= value <= 1.0 for value in logged.values())
    assert metrics["test/success"] == metrics["test/success_step1"] and math.isfinite(metrics["test/return"])


def test_success_rate_is_each_tasks_fraction_of_rollouts_then_the_mean_over_tasks() -> None:
    """Two tasks x 2 rollouts, evaluated before and after one step: per-task rates and returns, then the mean over tasks with its interval."""
    from types import SimpleNamespace

    from metalight.tasks.meta_world import MetaWorldSuccess

    callback = MetaWorldSuccess()
    callback._environment = object()  # as during an evaluation
    catalogue = SimpleNamespace(class_names=("reach-v3",))
    envs = [
        SimpleNamespace(num_envs=4, catalogue=catalogue, copy_classes=["reach-v3"] * 4, episode_success=np.array([True, False, True, True]), episode_return=np.array([1.0, 3.0, 2.0, 2.0])),
        SimpleNamespace(num_envs=4, catalogue=catalogue, copy_classes=["reach-v3"] * 4, episode_success=np.array([True, True, False, False]), episode_return=np.array([5.0, 5.0, 0.0, 4.0])),
    ]
    callback._made = envs
    callback._batch_end({"tasks": torch.zeros(2, 1)})
    # count 2; success per step: (0.5 + 1.0), (1.0 + 0.0); squares; returns (2 + 2), (5 + 2); squares
    assert callback._tally.sums.tolist() == [[2.0, 1.5, 1.0, 1.25, 1.0, 4.0, 7.0, 8.0, 29.0]] and callback._made == []
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))
    logged = callback._tally.metrics(trainer, torch.device("cpu"), "val", "", with_returns=False)
    assert logged["val/success_step0"] == 0.75 and logged["val/success_step1"] == 0.5 == logged["val/success"]
    assert logged["val/success_step0_ci95"] == pytest.approx(1.96 * np.std([0.5, 1.0], ddof=1) / np.sqrt(2))
    assert not any("return" in key for key in logged), "the learner logs the returns of the stage's own tasks"


def test_metaworld_needs_its_data_module_and_at_most_500_steps(reach) -> None:
    from metalight.tasks.meta_world import MetaWorldDataModule

    with pytest.raises(ConfigError, match="at most 500"):
        MetaWorldDataModule(env_options={"task": "reach"}, horizon=501)
    plain = RLDataModule(env="metaworld", env_options={"task": "reach"}, horizon=10)
    with pytest.raises(ConfigError, match="MetaWorldDataModule"):
        plain.setup()  # it draws each split's first task: the draw refuses, before any training
        plain.tasks("val")[[(0, 0)]]
