"""Two CPU processes (DDP over gloo) train and validate regression learners exactly as one process does.

Run as a script (`python tests/test_regression_ddp.py OUT_DIR`) it fits each learner on data=sinusoid's data module
with Trainer(strategy="ddp", devices=2): the data module shards each meta-batch and the fixed validation tasks over
the ranks by itself. The test launches it, repeats the runs in one process, and compares weights and val/* metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from algo_tasks import end_distributed, fit_validate_save, launch_two_processes

from metalight.algorithms import CNP, MAML, MetaSGD, Reptile
from metalight.models import MLP, CNPNetwork
from metalight.tasks import RegressionDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
# MAML second order on vmap (the CPU default for an MLP) and on the loop; Meta-SGD's learned step sizes;
# Reptile's persistent inner Adam, whose moments the ranks average once per meta-step; CNP, the model-based learner
LEARNERS = ("maml_vmap", "maml_loop", "metasgd_vmap", "reptile_vmap", "cnp")


def build(name: str):
    """The learner under test, identically initialized in every process (float64: sums over ranks in another order agree)."""
    torch.manual_seed(0)
    kind, _, path = name.partition("_")
    if kind == "cnp":
        return CNP(CNPNetwork(encoder=[8, 8], decoder=[8]).double(), optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    model = MLP(1, 1, hidden=[8, 8], init="default").double()
    if kind == "maml":
        return MAML(model, inner_lr=0.05, inner_steps=2, eval_inner_steps=3, task_parallel=path)
    if kind == "metasgd":
        return MetaSGD(model, inner_lr=0.05, inner_steps=1, eval_inner_steps=2, task_parallel=path)
    return Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, eval_inner_steps=2, seed=3, task_parallel=path)


def run(name: str, devices: int, out_dir: Path) -> None:
    """Fit STEPS meta-steps of 4 sinusoid tasks (2 per rank), validate on 5 fixed tasks (3 and 2 per rank), save this rank's results."""
    datamodule = RegressionDataModule("metalight.tasks.families.sinusoid", k_shot=6, k_query=4, meta_batch_size=4, eval_batch_size=2,
                                      batches_per_epoch=STEPS, n_val_tasks=5, seed=7)
    algorithm = build(name)
    fit_validate_save(algorithm, datamodule, STEPS, devices, out_dir / name)


@pytest.mark.slow
def test_two_processes_match_one_on_sinusoids(tmp_path):
    launch_two_processes(__file__, tmp_path)
    for name in LEARNERS:
        run(name, 1, tmp_path)
        single = torch.load(tmp_path / f"{name}-1-0.pt")
        ranks = [torch.load(tmp_path / f"{name}-2-{rank}.pt") for rank in (0, 1)]
        start = build(name).state_dict()
        assert any(not torch.equal(start[k], v) for k, v in single["params"].items()), f"{name}: training moved nothing"
        for key, value in single["params"].items():
            assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), f"{name}: ranks differ on {key}"
            torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-9, msg=f"{name}: {key}")
        assert "val/mse" in single["val"] and set(ranks[0]["val"]) == set(single["val"])
        for key, value in single["val"].items():
            assert ranks[0]["val"][key] == ranks[1]["val"][key]
            assert ranks[0]["val"][key] == pytest.approx(value, rel=1e-9), f"{name}: {key}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    for learner in LEARNERS:
        run(learner, 2, Path(sys.argv[1]))
    end_distributed()
