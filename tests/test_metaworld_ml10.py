"""Meta-World ML10 (data=metaworld_ml10): task numbers -> class and goal, class-balanced training draws, fixed evaluation
lists, copies of different classes stepped together, success per class, bad names, one run of the protocol."""

from __future__ import annotations

import csv
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
metaworld = pytest.importorskip("metaworld", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.envs.meta_world import catalogue  # noqa: E402
from metalight.errors import ConfigError  # noqa: E402
from metalight.tasks.meta_world import MetaWorldDataModule, Tally, task_results  # noqa: E402

ML10 = {"benchmark": "ML10", "task": None}
TRAIN = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "sweep-v3", "basketball-v3")
TEST = ("drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3")


@pytest.fixture(scope="module")
def ml10() -> MetaWorldDataModule:
    """ML10's data module: 3 held-out goals per training class, 4 test goals per test class, 2 training goals per class at test."""
    module = MetaWorldDataModule(env_options=ML10, horizon=8, rollouts=1, meta_batch_size=20, n_val_tasks=3, n_test_tasks=4, n_train_class_tasks=2, eval_batch_size=7)
    module.setup()
    return module


def rand_vec(number: int) -> np.ndarray:
    """The goal vector task `number` holds (Meta-World pickles it in the Task)."""
    return np.asarray(pickle.loads(catalogue(**ML10).tasks[number].data)["rand_vec"])


def test_task_numbers_are_ml10s_train_tasks_then_its_test_tasks_class_by_class(ml10) -> None:
    """0-499: the 10 training classes in ML10's order, 50 goals each; 500-749: the 5 test classes; each goal distinct within its class."""
    tasks = catalogue(**ML10)
    assert tasks.train_classes == TRAIN and tasks.test_classes == TEST and len(tasks.tasks) == 750
    for i, name in enumerate(TRAIN + TEST):
        numbers = tasks.goals(name, "train" if i < 10 else "test")
        assert numbers == list(range(50 * i, 50 * i + 50)), name
        assert len({tuple(rand_vec(n)) for n in numbers[:5]}) == 5
    assert tasks.class_of(0) == "reach-v3" and tasks.class_of(499) == "basketball-v3" and tasks.class_of(500) == "drawer-open-v3"


def test_an_arm_is_of_its_tasks_class_set_to_its_goal(ml10) -> None:
    """reset() gives copy i an arm of its task's class whose goal vector is the task's (numbers of three classes, one class twice)."""
    numbers = [500, 3, 549, 460]
    env = ml10.environment.make(4)
    env.reset(options={"tasks": torch.tensor(numbers, dtype=torch.float32).view(4, 1)})
    classes = catalogue(**ML10).classes
    assert env.copy_classes == ["drawer-open-v3", "reach-v3", "drawer-open-v3", "basketball-v3"]
    for sim, number, name in zip(env.sims, numbers, env.copy_classes):
        assert type(sim) is classes[name]
        assert np.allclose(sim._last_rand_vec, rand_vec(number)), number
    assert env.sims[0] is not env.sims[2], "two copies of one class are two arms"


def test_copies_of_different_classes_step_together_as_each_alone(ml10) -> None:
    """Four copies (drawer-open twice, reach, basketball) stepped together give each copy what stepping it alone gives."""
    numbers, steps = [500, 3, 549, 460], 6
    actions = torch.rand(steps, 4, 4, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    env = ml10.environment.make(4)
    observation, _ = env.reset(options={"tasks": torch.tensor(numbers, dtype=torch.float32).view(4, 1)})
    together = [(observation, None, None)]
    for t in range(steps):
        observation, reward, _, _, info = env.step(actions[t])
        together.append((observation, reward, info["success"]))
    for i, number in enumerate(numbers):
        alone = ml10.environment.make(1)
        observation, _ = alone.reset(options={"tasks": torch.tensor([[float(number)]])})
        assert torch.equal(observation[0], together[0][0][i])
        for t in range(steps):
            observation, reward, _, _, info = alone.step(actions[t, i : i + 1])
            assert torch.equal(observation[0], together[t + 1][0][i]) and float(reward[0]) == float(together[t + 1][1][i]), (number, t)
            assert info["success"][0] == together[t + 1][2][i]
    assert not torch.equal(together[-1][0][0], together[-1][0][2]), "the two drawer-open copies have different goals and objects"


def test_training_draws_deal_the_training_classes_in_turn_never_a_test_class_nor_a_held_out_goal(ml10) -> None:
    tasks = catalogue(**ML10)
    keys = [(e, i) for e in range(3) for i in range(40)]
    numbers = ml10.tasks("train")[keys]["tasks"][:, 0].long().tolist()
    held_out = {n for name in TRAIN for n in tasks.goals(name, "train")[-3:]}
    assert all(n < 500 for n in numbers) and not set(numbers) & held_out
    assert [tasks.class_of(n) for n in numbers[:20]] == list(TRAIN) * 2, "task i is of class i mod 10"
    assert len(set(numbers)) > 90, "goals drawn, not fixed"
    again = ml10.tasks("train")[keys]
    assert again["tasks"][:, 0].long().tolist() == numbers


def test_val_and_test_lists_are_fixed_and_interleave_the_classes(ml10) -> None:
    """val: the last 3 goals of each training class; test: the first 4 of each test class; train_classes: the first 2 of each
    training class; each once, goal by goal across the classes; the same numbers and noise seeds on every call."""
    tasks = catalogue(**ML10)
    listed = {
        "val": [int(n) for batch in ml10.val_dataloader() for n in batch["tasks"][:, 0].tolist()],
        "test": [int(n) for batch in ml10.test_dataloader() for n in batch["tasks"][:, 0].tolist()],
        "train_classes": [int(n) for batch in ml10.train_class_loader() for n in batch["tasks"][:, 0].tolist()],
    }
    assert listed["val"] == [tasks.goals(name, "train")[47 + g] for g in range(3) for name in TRAIN]
    assert listed["test"] == [500 + 50 * c + g for g in range(4) for c in range(5)]
    assert listed["train_classes"] == [50 * c + g for g in range(2) for c in range(10)]
    for part in ("val", "test", "train_classes"):
        first = ml10.tasks(part)[[(0, i) for i in range(10)]]
        second = ml10.tasks(part)[[(0, i) for i in range(10)]]
        assert torch.equal(first["tasks"], second["tasks"]) and torch.equal(first["seeds"], second["seeds"])


def test_success_and_return_are_averaged_per_class_and_over_tasks() -> None:
    """Three tasks (2 of reach, 1 of push) x 2 rollouts, scored before and after one step, by hand."""
    classes = SimpleNamespace(class_names=("reach-v3", "push-v3", "drawer-open-v3"))
    copies = ["reach-v3", "reach-v3", "push-v3", "push-v3", "reach-v3", "reach-v3"]
    made = [
        SimpleNamespace(num_envs=6, catalogue=classes, copy_classes=copies, episode_success=np.array([1, 0, 1, 1, 0, 0], bool), episode_return=np.array([2.0, 4, 10, 10, 0, 2])),
        SimpleNamespace(num_envs=6, catalogue=classes, copy_classes=copies, episode_success=np.array([1, 1, 0, 1, 1, 0], bool), episode_return=np.array([6.0, 6, 8, 6, 1, 1])),
    ]
    names, success, returns = task_results(made, 3)
    assert names == ["reach-v3", "push-v3", "reach-v3"]
    assert success.tolist() == [[0.5, 1.0], [1.0, 0.5], [0.0, 0.5]] and returns.tolist() == [[3.0, 6.0], [10.0, 7.0], [1.0, 1.0]]
    tally = Tally(classes.class_names)
    tally.add(names, success, returns)
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))
    logged = tally.metrics(trainer, torch.device("cpu"), "test", "train_classes_", with_returns=True)
    assert logged["test/reach/success_step0"] == 0.25 and logged["test/reach/success_step1"] == 0.75 and logged["test/push/success_step1"] == 0.5
    assert logged["test/reach/return_step1"] == 3.5 and logged["test/push/return_step0"] == 10.0
    assert logged["test/train_classes_success_step0"] == pytest.approx(0.5) and logged["test/train_classes_return_step1"] == pytest.approx(14 / 3)
    assert logged["test/train_classes_success"] == logged["test/train_classes_success_step1"] and "test/drawer-open/success_step0" not in logged
    assert logged["test/train_classes_success_step0_ci95"] == pytest.approx(1.96 * np.std([0.5, 1.0, 0.0], ddof=1) / math.sqrt(3))


@pytest.mark.parametrize(
    "options, named",
    [({"benchmark": "ML11", "task": None}, ["ML11", "ML1,", "ML10", "ML45"]), ({"benchmark": "ML10", "task": "push"}, ["task='push'", "task=null"]), ({"benchmark": "ML1", "task": "psh"}, ["psh", "push", "pick-place"])],
)
def test_unknown_benchmark_or_skill_is_one_line_naming_the_known_ones(options, named) -> None:
    with pytest.raises(ConfigError) as error:
        MetaWorldDataModule(env_options=options, horizon=10)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in named), message
    with pytest.raises(ConfigError, match="n_train_class_tasks"):
        MetaWorldDataModule(env_options=ML10, horizon=10, n_val_tasks=10, n_train_class_tasks=41)


@pytest.mark.slow
def test_ml10_protocol_logs_test_and_training_class_success_after_each_step(compose_generated, ml10, tmp_path) -> None:
    """train.py on experiment=maml_trpo_metaworld_ml10 shrunk (1 meta-step of 10 tasks x 1 rollout of 4 steps, one goal per
    class everywhere, 1 inner step at test): test/ and test/train_classes_ success and return after steps 0 and 1, per class."""
    from metalight.runs.training import train

    cfg = compose_generated(
        "experiment=maml_trpo_metaworld_ml10", "trainer.max_steps=1", "data.meta_batch_size=10", "data.rollouts=1", "data.horizon=4",
        "data.n_val_tasks=1", "data.n_test_tasks=1", "data.n_train_class_tasks=1", "data.batches_per_epoch=1", "algo.eval_inner_steps=1", "logger=csv",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = {key: float(row[key]) for row in rows for key in row if row[key] and key.startswith("test/")}
    for prefix in ("test/", "test/train_classes_"):
        assert {f"{prefix}{what}_step{k}" for what in ("success", "return") for k in (0, 1)} <= set(logged), prefix
    assert {f"test/{name[:-3]}/success_step1" for name in TRAIN + TEST} <= set(logged)
    assert all(0.0 <= value <= 1.0 for key, value in logged.items() if "success" in key and "ci95" not in key)
    assert objects["algorithm"].environment.make.__name__ != "make", "the learner has its environment back"
    saved = objects["algorithm"].test_results  # what eval.py writes to <checkpoint>.test.json
    assert saved["train_classes_success_step1"] == metrics["test/train_classes_success_step1"] and "success_step1" in saved and "return_steps" in saved
    assert metrics["test/train_classes_return_step0"] == pytest.approx(np.mean([logged[f"test/{name[:-3]}/return_step0"] for name in TRAIN]))
    for k in (0, 1):  # the environments' returns per class, averaged, are the learner's own test/return (one goal per class)
        assert metrics[f"test/return_step{k}"] == pytest.approx(np.mean([logged[f"test/{name[:-3]}/return_step{k}"] for name in TEST]), rel=1e-4)
