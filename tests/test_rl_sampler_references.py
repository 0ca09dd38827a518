"""benchmarks/rl_references.py: each reference loop makes the policy calls and environment steps of the sampler it
stands for (pytorch-maml-rl: one call per task and step on its rollouts; Finn et al.'s VectorizedSampler: one call per
rollout and step across the tasks, each with its own weights; one at a time: batch-1 calls), so the benchmark's ratios
compare those orders of work. Not a timing test."""

import importlib.util
from pathlib import Path

import torch

from metalight.algorithms import MAMLRL
from metalight.models import GaussianMLP
from metalight.tasks import RLDataModule

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rl_references", ROOT / "benchmarks" / "rl_references.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TASKS, ROLLOUTS, HORIZON = 3, 2, 4


class Counted:
    """Records the batch shape of every call to `fn` (a policy) or every vector environment `make` builds and steps."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, *args):
        self.shapes.append(tuple(args[-1].shape))
        return self.fn(*args)


def counted_env(datamodule):
    """make(num_envs) whose environments record (num_envs, task rows) of each step into `steps`."""
    steps, resets = [], []

    def make(num_envs):
        env = datamodule.make_env(num_envs)
        step, reset = env.step, env.reset

        def counted_reset(**kwargs):
            resets.append(kwargs["options"]["tasks"].clone())
            return reset(**kwargs)

        env.step, env.reset = (lambda action: (steps.append(tuple(action.shape)), step(action))[1]), counted_reset
        return env

    return make, steps, resets


def test_reference_loops_make_the_calls_of_the_samplers_they_stand_for() -> None:
    datamodule = RLDataModule(horizon=HORIZON, rollouts=ROLLOUTS, meta_batch_size=TASKS)
    datamodule.setup()
    algorithm = MAMLRL(GaussianMLP())
    algorithm.use_task_kind(datamodule.kind)
    tasks = datamodule.tasks("train")[[(0, i) for i in range(TASKS)]]["tasks"]
    params = algorithm.per_task({k: v.detach() for k, v in algorithm.model.named_parameters()}, TASKS)
    params["mean.4.bias"] = params["mean.4.bias"] + torch.arange(TASKS).view(-1, 1)  # tell the tasks' weights apart

    make, steps, resets = counted_env(datamodule)
    model = Counted(algorithm.model)
    ref.pytorch_maml_rl(make, model, tasks, ROLLOUTS, HORIZON)
    assert model.shapes == [(ROLLOUTS, 2)] * (TASKS * HORIZON) and steps == [(ROLLOUTS, 2)] * (TASKS * HORIZON)
    assert [r.tolist() for r in resets] == [[t.tolist()] * ROLLOUTS for t in tasks], "each task's own vector environment of its rollouts"

    make, steps, resets = counted_env(datamodule)
    policy = Counted(algorithm.policy)
    ref.finn_vectorized(make, policy, params, tasks, ROLLOUTS, HORIZON)
    assert policy.shapes == [(TASKS, 1, 2)] * (ROLLOUTS * HORIZON) and steps == [(TASKS, 2)] * (ROLLOUTS * HORIZON)
    assert all(torch.equal(r, tasks) for r in resets) and len(resets) == ROLLOUTS, "one copy per task, its episodes in turn"
    observation = torch.zeros(TASKS, 1, 2)
    means = algorithm.policy(params, observation)[0]
    assert not torch.allclose(means[0], means[1]), "each task acts with its own weights in the one call"

    make, steps, resets = counted_env(datamodule)
    model = Counted(algorithm.model)
    ref.one_at_a_time(make, model, tasks, ROLLOUTS, HORIZON)
    assert model.shapes == [(1, 2)] * (TASKS * ROLLOUTS * HORIZON) and steps == [(1, 2)] * (TASKS * ROLLOUTS * HORIZON)
    assert len(resets) == TASKS * ROLLOUTS


def test_summary_reports_medians_and_ratios_of_medians() -> None:
    result = ref.summary({"metalight": [1.0, 9.0, 2.0], "other": [4.0, 6.0, 100.0]}, steps=12)
    assert result["metalight_steps_per_s"] == 6 and result["other_steps_per_s"] == 2 and result["metalight_over_other"] == 3.0
