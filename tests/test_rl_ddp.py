"""Two CPU processes (DDP over gloo) train and validate MAML-RL exactly as one process does (TRPO included), MAML-PPO and RL².

Run as a script (`python tests/test_rl_ddp.py OUT_DIR`) it fits MAML-RL (second order, TRPO outer step; the
first-order variant differs only in the inner step's graph: add "first_order" to LEARNERS) on data=navigation2d's
data module with Trainer(strategy="ddp", devices=2): each rank rolls out its half of the meta-batch, the
meta-gradient is averaged by DDP, and TRPO averages its Fisher-vector products and line-search values over the
ranks. MAML-PPO ("ppo": 2 epochs of Adam per meta-batch, the first inside compute_meta_gradient) checks that every
epoch's meta-gradient is averaged over the ranks; RL² ("rl2": a GRU policy, trials of 2 episodes, 2 epochs) the same for
its PPO on whole trials. The test launches it, repeats the runs in one process, and compares.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from algo_tasks import end_distributed, fit_validate_save, launch_two_processes

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.algorithms import MAMLPPO, MAMLRL, RL2  # noqa: E402
from metalight.models import GaussianGRU, GaussianMLP  # noqa: E402
from metalight.tasks import RLDataModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
LEARNERS = ("second_order", "ppo", "rl2")


def policy(name: str) -> torch.nn.Module:
    """The learner's policy in float64, its weights drawn from seed 0: RL²'s recurrent, the others' an MLP."""
    torch.manual_seed(0)
    return (GaussianGRU(2, 2, hidden=8) if name == "rl2" else GaussianMLP(2, 2, hidden=(16, 16))).double()


def run(name: str, devices: int, out_dir: Path) -> None:
    """Fit STEPS meta-steps of 4 goals (2 per rank), validate on 5 fixed goals (3 and 2 per rank), save this rank's results."""
    datamodule = RLDataModule(horizon=20, rollouts=4, meta_batch_size=4, eval_batch_size=2, batches_per_epoch=STEPS, n_val_tasks=5, seed=7)
    model = policy(name)
    optimizer = partial(torch.optim.Adam, lr=0.01)  # PPO: a large step, so that a rank that stepped on its own half of the gradient would be seen
    if name == "ppo":
        algorithm = MAMLPPO(model, epochs=2, clip=0.2, inner_lr=0.5, eval_inner_steps=2, optimizer=optimizer)
    elif name == "rl2":
        algorithm = RL2(model, episodes_per_trial=2, epochs=2, optimizer=optimizer)
    else:
        algorithm = MAMLRL(model, inner_lr=0.5, eval_inner_steps=2, first_order=name == "first_order")
    algorithm.use_task_kind(datamodule.kind)
    fit_validate_save(algorithm, datamodule, STEPS, devices, out_dir / name)


@pytest.mark.slow
def test_two_processes_match_one_on_navigation(tmp_path):
    launch_two_processes(__file__, tmp_path)
    for name in LEARNERS:
        run(name, 1, tmp_path)
        single = torch.load(tmp_path / f"{name}-1-0.pt")
        ranks = [torch.load(tmp_path / f"{name}-2-{rank}.pt") for rank in (0, 1)]
        start = policy(name).state_dict()
        assert any(not torch.equal(start[k.removeprefix("model.")], v) for k, v in single["params"].items()), f"{name}: training moved nothing"
        for key, value in single["params"].items():
            assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), f"{name}: ranks differ on {key}"
            # float64 sums over ranks run in another order; TRPO's 10 conjugate-gradient steps and its scaling by the curvature
            # amplify that rounding to ~1e-8 over 3 steps (measured: at most 8.5e-9), far below what a missing average would give
            torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-7, msg=f"{name}: {key}")
        assert "val/return" in single["val"] and set(ranks[0]["val"]) == set(single["val"])
        for key, value in single["val"].items():
            assert ranks[0]["val"][key] == ranks[1]["val"][key]
            assert ranks[0]["val"][key] == pytest.approx(value, rel=1e-6), f"{name}: {key}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    for learner in LEARNERS:
        run(learner, 2, Path(sys.argv[1]))
    end_distributed()
