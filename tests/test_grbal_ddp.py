"""Two CPU processes (DDP over gloo) fit GrBAL's dynamics model exactly as one process does (#32).

Run as a script (`python tests/test_grbal_ddp.py OUT_DIR`) it fits MAML's dynamics model for two iterations of
collect-and-fit on the crippled cheetah with Trainer(strategy="ddp", devices=2): every process collects the same
episodes (iteration 1 with the MPC controller through the model fitted so far), the data module splits each
meta-batch over the ranks. The test repeats the run in one process and compares weights, normalization statistics,
the collected episodes and val/* metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from algo_tasks import end_distributed, launch_two_processes, make_trainer
from lightning.pytorch.strategies import DDPStrategy

pytest.importorskip("mujoco")

from metalight.algorithms import MAML  # noqa: E402
from metalight.models import DynamicsMLP  # noqa: E402
from metalight.tasks.dynamics import DynamicsDataModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, STEPS = 2, 2  # iteration 0 random, iteration 1 planned through the model fitted on iteration 0


def build() -> tuple[DynamicsDataModule, MAML]:
    """The data module and the learner, identically initialized in every process (float64: sums over ranks in another order agree)."""
    datamodule = DynamicsDataModule(
        "halfcheetah_cripple", {"frame_skip": 1, "convention": "rllab"}, episode_length=10, rollouts=2, past=3, future=2,
        planner={"candidates": 6, "horizon": 2}, random_episodes=1, meta_batch_size=4, eval_batch_size=2, batches_per_epoch=STEPS,
        n_val_tasks=3, seed=5,
    )
    torch.manual_seed(0)
    return datamodule, MAML(DynamicsMLP(20, 6, hidden=[8], init="default").double(), inner_lr=0.05, inner_steps=1, eval_inner_steps=1)


def run(devices: int, out_dir: Path) -> None:
    """Fit EPOCHS x STEPS meta-steps, validate on 3 held-out segments (2 and 1 per rank), save this rank's state."""
    datamodule, algorithm = build()
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = make_trainer(max_epochs=EPOCHS, devices=devices, strategy=strategy, precision="64-true")
    trainer.fit(algorithm, datamodule=datamodule)
    trainer.validate(algorithm, datamodule=datamodule, verbose=False)
    result = {
        "params": {k: v.detach().clone() for k, v in algorithm.state_dict().items()},  # the normalization buffers too
        "episodes": datamodule.state_dict()["buffer"],
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "steps": trainer.global_step,
    }
    torch.save(result, out_dir / f"grbal-{devices}-{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_processes_fit_the_dynamics_model_as_one(tmp_path):
    launch_two_processes(__file__, tmp_path)
    run(1, tmp_path)
    single = torch.load(tmp_path / "grbal-1-0.pt")
    ranks = [torch.load(tmp_path / f"grbal-2-{rank}.pt") for rank in (0, 1)]
    assert single["steps"] == EPOCHS * STEPS and all(r["steps"] == single["steps"] for r in ranks)
    start = build()[1].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in single["params"].items() if k.endswith("weight")), "training moved nothing"
    for rank in ranks:
        for part in ("observations", "actions"):
            assert len(rank["episodes"][part]) == EPOCHS
            for mine, theirs in zip(rank["episodes"][part], single["episodes"][part]):
                assert torch.equal(mine, theirs), f"the ranks collected other episodes ({part})"
        for key, value in single["params"].items():
            torch.testing.assert_close(rank["params"][key], value, rtol=0, atol=1e-9, msg=key)
    assert "val/mse" in single["val"] and set(ranks[0]["val"]) == set(single["val"])
    for key, value in single["val"].items():
        assert ranks[0]["val"][key] == ranks[1]["val"][key] == pytest.approx(value, rel=1e-9), key


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(2, Path(sys.argv[1]))
    end_distributed()
