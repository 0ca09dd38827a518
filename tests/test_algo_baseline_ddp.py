"""algo=baseline under DDP: two CPU processes, each on half of every image batch, end with the weights and metrics of one.

Run as a script (`python tests/test_algo_baseline_ddp.py OUT_DIR`) it trains each head with Trainer(strategy="ddp",
devices=2) and saves each rank's weights and validation metrics; the test repeats the runs in one process and
compares. The body has no BatchNorm: under DDP each rank normalizes its own half batch (as any DDP training
does unless trainer.sync_batchnorm=true), which one process on the whole batch cannot reproduce.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from algo_tasks import _rank_and_world, end_distributed, launch_two_processes, train_validate_save
from torch import nn
from torch.utils.data import Dataset

from metalight.algorithms import Baseline

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS = ("linear", "cosine", "logistic")
STEPS, BATCH, CLASSES = 3, 8, 5


class TinyNet(nn.Module):
    """A BatchNorm-free body (8x8 grey images -> 12 features) and a linear head: any model with features and head will do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageStream(Dataset):
    """Batch g: BATCH labelled images drawn from seed g; each rank reads its contiguous share, as data.train_mode=flat deals them."""

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        rank, world = _rank_and_world()
        generator = torch.Generator().manual_seed(g)
        x = torch.randn(BATCH, 1, 8, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        share = BATCH // world
        return {"x": x[rank * share : (rank + 1) * share], "y": y[rank * share : (rank + 1) * share]}


def run(head: str, devices: int, out_dir: Path) -> None:
    """Train STEPS steps on image batches, validate, save this rank's results."""
    algorithm = Baseline(TinyNet().double(), head=head, num_classes=CLASSES, fit_epochs=3, seed=1)
    train_validate_save(algorithm, ImageStream(), STEPS, devices, str(out_dir / head))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    launch_two_processes(__file__, tmp_path)
    for head in HEADS:
        run(head, 1, tmp_path)
        single = torch.load(tmp_path / f"{head}-1-0.pt")
        ranks = [torch.load(tmp_path / f"{head}-2-{rank}.pt") for rank in (0, 1)]
        start = Baseline(TinyNet().double(), head=head, num_classes=CLASSES).state_dict()
        assert any(not torch.equal(start[k], v) for k, v in single["params"].items()), f"{head}: training moved nothing"
        for key, value in single["params"].items():
            assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), f"{head}: ranks differ on {key}"
            torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-10, msg=f"{head}: {key}")
        assert set(ranks[0]["val"]) == set(single["val"]) and "val/acc" in single["val"]
        for key, value in single["val"].items():
            assert ranks[0]["val"][key] == ranks[1]["val"][key] == pytest.approx(value, abs=1e-9), f"{head}: {key}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in HEADS:
        run(name, 2, Path(sys.argv[1]))
    end_distributed()
