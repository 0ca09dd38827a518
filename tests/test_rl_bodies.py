"""HalfCheetah bodies that change (data.env=halfcheetah_cripple, halfcheetah_rand_params): determinism, the mask, per-copy models, the draws, the planner's reward, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
mujoco = pytest.importorskip("mujoco", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.envs.bodies import JOINTS, PARAMETERS, HalfCheetahCripple, HalfCheetahRandParams  # noqa: E402
from metalight.errors import ConfigError  # noqa: E402
from metalight.tasks.rl import RLDataModule  # noqa: E402

GRBAL = {"frame_skip": 1, "convention": "rllab"}  # the authors' physics (conf/data/halfcheetah_cripple.yaml)


def actions(steps: int, copies: int, seed: int = 0) -> torch.Tensor:
    """Random actions [steps, copies, 6], some beyond [-1, 1] (clipped by the environment)."""
    return torch.randn(steps, copies, 6, generator=torch.Generator().manual_seed(seed)) * 1.2


def run(env, tasks: torch.Tensor, seeds: list[int], moves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(observations [steps + 1, copies, 20], rewards [steps, copies]) of env from reset(seeds, tasks) under moves."""
    observation, _ = env.reset(seed=seeds, options={"tasks": tasks})
    observations, rewards = [observation], []
    for move in moves:
        observation, reward, *_ = env.step(move)
        observations.append(observation)
        rewards.append(reward)
    return torch.stack(observations), torch.stack(rewards)


def rand_tasks(count: int, seed: int, **options) -> torch.Tensor:
    """count bodies [count, 68] drawn as the data module draws them (float32)."""
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([HalfCheetahRandParams.draw_task(rng, **options) for _ in range(count)]), dtype=torch.float32)


@pytest.mark.parametrize("cls", [HalfCheetahCripple, HalfCheetahRandParams])
def test_same_seed_and_body_replay_the_same_trajectory_and_other_bodies_move_otherwise(cls) -> None:
    """The same tasks and seeds give the same episode, also after the pooled simulators ran other bodies; two bodies
    under the same actions from the same start state part ways."""
    moves = actions(5, 2)
    tasks = torch.tensor([[1.0], [3.0]]) if cls is HalfCheetahCripple else rand_tasks(2, 0)
    others = torch.tensor([[4.0], [5.0]]) if cls is HalfCheetahCripple else rand_tasks(2, 1)
    env = cls(2, horizon=5, **GRBAL)
    first = run(env, tasks, [7, 7], moves)
    other = run(cls(2, horizon=5, **GRBAL), others, [7, 7], moves)
    again = run(cls(2, horizon=5, **GRBAL), tasks, [7, 7], moves)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0][0, :, :17], other[0][0, :, :17]), "the same seeds start from the same states (the centre of mass moves with the masses)"
    for copy_ in range(2):
        assert not torch.allclose(first[0][-1, copy_], other[0][-1, copy_], atol=1e-4), f"copy {copy_}: two bodies, one trajectory"


def test_the_crippled_joint_gets_no_torque_and_no_control_cost() -> None:
    """Each step equals MuJoCo stepped by hand from the same state with the clipped action, that joint's entry zeroed; the
    reward is the centre of mass's forward velocity minus 0.05 * sum(masked action^2), as learning_to_adapt's step."""
    env = HalfCheetahCripple(6, horizon=3, **GRBAL)
    env.reset(seed=0, options={"tasks": torch.arange(6.0).view(6, 1)})  # copy i cripples joint i
    data = mujoco.MjData(env.model)
    for move in actions(3, 6):
        before = env.states.copy()
        _, reward, *_, info = env.step(move)
        for i in range(6):
            applied = np.clip(move[i].double().numpy(), -1.0, 1.0)
            applied[i] = 0.0
            mujoco.mj_setState(env.model, data, before[i], env.state_spec)
            data.ctrl[:] = applied
            mujoco.mj_step(env.model, data)
            assert np.allclose(data.qpos, env.states[i, env.qpos], atol=1e-12) and np.allclose(data.qvel, env.states[i, env.qvel], atol=1e-12)
            mujoco.mj_forward(env.model, data)
            mujoco.mj_subtreeVel(env.model, data)
            velocity = data.subtree_linvel[env.model.body("torso").id][0]
            assert reward[i].item() == pytest.approx(velocity - 0.05 * np.sum(applied**2), abs=1e-5)
            assert info["reward_ctrl"][i] == pytest.approx(-0.05 * np.sum(applied**2))


def test_per_copy_models_stepped_together_equal_each_stepped_alone() -> None:
    """Three bodies in one rollout call give each body's own trajectory: a vector environment of that body alone, and
    MuJoCo stepped by hand on a fresh model whose arrays are the intact ones times the task's multipliers."""
    tasks, moves, seeds = rand_tasks(3, 5), actions(4, 3, seed=1), [11, 12, 13]
    together = run(HalfCheetahRandParams(3, horizon=4, **GRBAL), tasks, seeds, moves)
    for i in range(3):
        alone = run(HalfCheetahRandParams(1, horizon=4, **GRBAL), tasks[i : i + 1], seeds[i : i + 1], moves[:, i : i + 1])
        assert torch.allclose(together[0][:, i], alone[0][:, 0], atol=1e-6) and torch.allclose(together[1][:, i], alone[1][:, 0], atol=1e-6)
    env = HalfCheetahRandParams(3, horizon=4, **GRBAL)
    env.reset(seed=seeds, options={"tasks": tasks})
    start, sizes = env.states.copy(), [int(np.prod(shape)) for shape, _ in PARAMETERS.values()]
    for i in range(3):
        model = copy.copy(env.model)
        for (name, (shape, _)), part in zip(PARAMETERS.items(), np.split(tasks[i].double().numpy(), np.cumsum(sizes)[:-1])):
            getattr(model, name)[:] = getattr(env.model, name) * part.reshape(shape)
        data = mujoco.MjData(model)
        mujoco.mj_setState(model, data, start[i], env.state_spec)
        for move in moves:
            data.ctrl[:] = np.clip(move[i].double().numpy(), -1.0, 1.0)
            mujoco.mj_step(model, data)
        assert np.allclose(data.qpos[1:], together[0][-1, i, :8].double().numpy(), atol=1e-5)
        mujoco.mj_forward(model, data)
        mujoco.mj_subtreeVel(model, data)
        torso = model.body("torso").id  # the centre of mass of this body's masses: observed, and rewarded
        assert np.allclose(data.subtree_com[torso], together[0][-1, i, -3:].double().numpy(), atol=1e-5)
        control = 0.05 * np.sum(np.clip(moves[-1, i].double().numpy(), -1.0, 1.0) ** 2)
        assert together[1][-1, i].item() == pytest.approx(data.subtree_linvel[torso][0] - control, abs=1e-5)
    assert env.model.body_mass[1] == pytest.approx(6.2502, abs=1e-4), "the shared (intact) model is never changed"


def test_multipliers_are_drawn_per_element_inside_base_to_the_plus_minus_limit() -> None:
    """Each element of each randomized array has its own multiplier in [base^-L, base^L] (1.5, damping 1.3), reaching
    near both ends; the arrays left out of rand_params stay 1."""
    draws = np.stack([HalfCheetahRandParams.draw_task(np.random.default_rng(i), log_scale_limit=0.5) for i in range(300)])
    start, bases = 0, {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}  # rand_param_envs' base.py
    for name, (shape, _) in PARAMETERS.items():
        base = bases[name]
        part, start = draws[:, start : start + int(np.prod(shape))], start + int(np.prod(shape))
        exponents = np.log(part) / np.log(base)
        assert exponents.min() >= -0.5 - 1e-12 and exponents.max() <= 0.5 + 1e-12, name
        assert exponents.min() < -0.49 and exponents.max() > 0.49, f"{name}: not spread over the range"
        assert np.all(part.std(1) > 0), f"{name}: one multiplier for the whole array"
    assert draws.shape[1] == HalfCheetahRandParams.task_dim == 68
    only_mass = HalfCheetahRandParams.draw_task(np.random.default_rng(0), rand_params=["body_mass"])
    assert np.all(only_mass[8:] == 1.0) and np.all(only_mass[:8] != 1.0)


@pytest.mark.parametrize("env, options", [("halfcheetah_cripple", {}), ("halfcheetah_rand_params", {}), ("halfcheetah_cripple", {"test_joints": [2, 4]})])
def test_test_tasks_are_fixed_by_eval_seed_whatever_the_training_seed(env, options) -> None:
    """Validation and test tasks (bodies and noise) depend on eval_seed only; training tasks on seed."""
    keys = [(0, i) for i in range(8)]
    one, two = (RLDataModule(env=env, env_options=options, seed=seed, eval_seed=3) for seed in (0, 1))
    for part in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(one.tasks(part)[keys].values(), two.tasks(part)[keys].values()))
    assert not torch.equal(one.tasks("train")[keys]["seeds"], two.tasks("train")[keys]["seeds"])


def test_training_draws_never_cripple_a_test_joint() -> None:
    """Training and validation cripple one of train_joints, uniformly (learning_to_adapt's randint(1, 6): never bthigh),
    the test one of test_joints; both are options."""
    module = RLDataModule(env="halfcheetah_cripple")
    keys = [(epoch, i) for epoch in range(10) for i in range(60)]
    train = module.tasks("train")[keys]["tasks"][:, 0].long()
    assert set(train.tolist()) == {1, 2, 3, 4, 5} and np.all(np.bincount(train.numpy())[1:] > 70)
    assert set(module.tasks("val")[keys[:60]]["tasks"][:, 0].long().tolist()) <= {1, 2, 3, 4, 5}
    assert set(module.tasks("test")[keys[:60]]["tasks"][:, 0].long().tolist()) == {0}
    custom = RLDataModule(env="halfcheetah_cripple", env_options={"train_joints": [0, 3], "test_joints": [5]})
    assert set(custom.tasks("train")[keys[:60]]["tasks"][:, 0].long().tolist()) == {0, 3}
    assert set(custom.tasks("test")[keys[:60]]["tasks"][:, 0].long().tolist()) == {5}


@pytest.mark.parametrize("cls", [HalfCheetahCripple, HalfCheetahRandParams])
def test_reward_function_is_the_authors_formula_on_a_stepped_transition(cls) -> None:
    """reward(obs, act, next_obs) is learning_to_adapt's HalfCheetahEnv.reward ((next_obs[-3] - obs[-3]) / dt - 0.05 *
    sum(a^2), a clipped) on transitions the environment made, for any leading dimensions."""
    env = cls(3, horizon=2, **GRBAL)
    tasks = torch.tensor([[1.0], [2.0], [5.0]]) if cls is HalfCheetahCripple else rand_tasks(3, 2)
    moves = actions(2, 3)
    observations, _ = run(env, tasks, [0, 1, 2], moves)
    obs, next_obs, act = observations[:-1].double().numpy(), observations[1:].double().numpy(), np.clip(moves.double().numpy(), -1.0, 1.0)
    authors = (next_obs[..., -3] - obs[..., -3]) / 0.01 - 1e-1 * 0.5 * np.sum(np.square(act), -1)
    got = env.reward(observations[:-1], moves, observations[1:])
    assert env.dt == 0.01 and got.shape == (2, 3) and np.allclose(got.numpy(), authors, atol=1e-3)


@pytest.mark.parametrize(
    "env, options, expected",
    [
        ("halfcheetah_cripple", {"test_joints": [6]}, "data.env_options.test_joints=[6] must be a non-empty list of the cheetah's joints: numbers in 0-5 (0 bthigh"),
        ("halfcheetah_cripple", {"train_joints": []}, "data.env_options.train_joints=[]"),
        ("halfcheetah_cripple", {"train_joints": ["bthigh"]}, "5 ffoot"),
        ("halfcheetah_rand_params", {"log_scale_limit": 0.0}, "log_scale_limit=0.0 gives an empty or negative scale range"),
        ("halfcheetah_rand_params", {"log_scale_limit": -1}, "empty or negative scale range"),
        ("halfcheetah_rand_params", {"rand_params": ["mass"]}, "rand_params=['mass'] must be a non-empty list of body_mass, body_inertia"),
        ("halfcheetah_rand_params", {"rand_params": []}, "rand_params=[]"),
        ("halfcheetah_rand_params", {"no_such_option": 1}, "are not options of data.env=halfcheetah_rand_params"),
    ],
)
def test_bad_options_are_one_line_errors(env, options, expected) -> None:
    with pytest.raises(ConfigError) as error:
        RLDataModule(env=env, env_options=options)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_bad_joint_stops_train_py_with_one_line_and_status_2(tmp_path, train_py_in_process) -> None:
    tiny = ["trainer.max_steps=1", "data.horizon=2", "data.meta_batch_size=1", "data.rollouts=1", "data.n_val_tasks=1", "data.n_test_tasks=1"]
    status, output = train_py_in_process(tmp_path, tmp_path / "logs", "data=halfcheetah_cripple", "algo=maml_rl", *tiny, "data.env_options.test_joints=[7]")
    assert status == 2 and "data.env_options.test_joints=[7]" in output and "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*")), "a run stopped by a bad input left its folder behind"


def test_crippled_limb_is_coloured_red_for_rendering() -> None:
    """geom_colours: the intact colours with the crippled joint's geom red, as learning_to_adapt's reset_task paints it."""
    env = HalfCheetahCripple(1)
    rgba = env.model.geom_rgba.copy()
    for joint, name in enumerate(JOINTS):
        colours = HalfCheetahCripple.geom_colours(env.model, rgba, joint)
        red = env.model.geom(name).id
        assert np.array_equal(colours[red], [1.0, 0.0, 0.0, rgba[red, 3]])
        assert np.array_equal(np.delete(colours, red, 0), np.delete(rgba, red, 0))
    assert np.array_equal(env.model.geom_rgba, rgba), "the model itself is not painted"
