"""Synthetic few-shot tasks and tiny networks for the algorithm tests (no data set needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from metalight.models import Conv4


def make_batch(
    n_tasks: int, n_way: int = 3, k_shot: int = 2, k_query: int = 2, size: int = 8, channels: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """A meta-batch following the batch contract: class-major labels, float images; classes differ in mean."""
    generator = torch.Generator().manual_seed(seed)

    def images(shots: int) -> Tensor:
        noise = torch.randn(n_tasks, n_way * shots, channels, size, size, generator=generator, dtype=torch.float64)
        means = torch.randn(n_tasks, n_way, 1, 1, 1, 1, generator=generator, dtype=torch.float64).repeat_interleave(shots, dim=1)
        return (noise + means.squeeze(2)).to(dtype)

    def labels(shots: int) -> Tensor:
        return torch.arange(n_way).repeat_interleave(shots).repeat(n_tasks, 1)

    return {"support_x": images(k_shot), "support_y": labels(k_shot), "query_x": images(k_query), "query_y": labels(k_query)}


def tiny_conv4(n_way: int = 3, size: int = 8, hidden: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> Conv4:
    """MAML's strided Conv4 with a few channels: small enough for float64 checks in milliseconds."""
    torch.manual_seed(seed)
    return Conv4(1, n_way, hidden=hidden, image_size=size, pool=False, **kwargs).to(dtype)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TrainStream(Dataset):
    """Meta-batch g = make_batch(seed=g); each DDP rank reads its contiguous share, as the data contract says."""

    def __init__(self, n_batches: int, meta_batch_size: int, **task_kwargs) -> None:
        self.n_batches, self.meta_batch_size, self.task_kwargs = n_batches, meta_batch_size, task_kwargs

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, g: int) -> dict[str, Tensor]:
        rank, world = _rank_and_world()
        share = self.meta_batch_size // world
        return {k: v[rank * share : (rank + 1) * share] for k, v in make_batch(self.meta_batch_size, seed=g, **self.task_kwargs).items()}


class EvalTasks(Dataset):
    """A fixed set of tasks dealt round-robin to ranks (rank r holds tasks r, r+W, ...), in batches."""

    def __init__(self, n_tasks: int, batch_size: int, **task_kwargs) -> None:
        self.n_tasks, self.batch_size, self.task_kwargs = n_tasks, batch_size, task_kwargs

    def _batches(self) -> list[dict[str, Tensor]]:
        rank, world = _rank_and_world()  # read when used: DDP is set up after the dataset is built
        everything = make_batch(self.n_tasks, seed=1000, **self.task_kwargs)
        mine = torch.arange(rank, self.n_tasks, world)
        return [{k: v[chunk] for k, v in everything.items()} for chunk in mine.split(self.batch_size)]

    def __len__(self) -> int:
        return len(self._batches())

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self._batches()[i]


def loader(dataset: Dataset) -> DataLoader:
    """Items are whole (per-rank) meta-batches already."""
    return DataLoader(dataset, batch_size=None)


def make_trainer(**overrides) -> pl.Trainer:
    """A quiet CPU Trainer as the configs build it: manual optimization, inference_mode=False."""
    options = dict(
        accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    return pl.Trainer(**(options | overrides))


def train_validate_save(algorithm: pl.LightningModule, train: Dataset, steps: int, devices: int, out_file: str) -> None:
    """Train `steps` steps (DDP over gloo when devices > 1), validate on 5 tasks (unequal shares: 3 and 2), and
    save this rank's weights, val/* metrics and any inner optimizer state to out_file + f"-{devices}-{rank}.pt"."""
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"  # CPU processes, whatever the machine has
    trainer = make_trainer(max_steps=steps, devices=devices, strategy=strategy, precision="64-true")
    trainer.fit(algorithm, loader(train))
    trainer.validate(algorithm, loader(EvalTasks(5, 2, k_shot=3, dtype=torch.float64)), verbose=False)
    result = {
        "params": {k: v.detach().clone() for k, v in algorithm.state_dict().items()},  # learned step sizes, BN statistics too
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "inner_state": getattr(algorithm, "inner_optimizer_state", None),
    }
    torch.save(result, f"{out_file}-{devices}-{trainer.global_rank}.pt")


def fit_validate_save(algorithm: pl.LightningModule, datamodule: pl.LightningDataModule, steps: int, devices: int, out_file: Path) -> None:
    """Fit `steps` meta-steps from a data module (DDP over gloo when devices > 1), validate, and save this rank's weights
    and val/* metrics to f"{out_file}-{devices}-{rank}.pt"."""
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = make_trainer(max_steps=steps, devices=devices, strategy=strategy, precision="64-true")
    trainer.fit(algorithm, datamodule=datamodule)
    trainer.validate(algorithm, datamodule=datamodule, verbose=False)
    result = {
        "params": {k: v.detach().clone() for k, v in algorithm.state_dict().items()},
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    torch.save(result, f"{out_file}-{devices}-{trainer.global_rank}.pt")


def end_distributed() -> None:
    """Destroy the gloo process group before a DDP test script exits: left to interpreter teardown, its threads
    can abort the process ("terminate called without an active exception") after the results are saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_two_processes(script: str, out_dir: Path) -> None:
    """Run `python script out_dir` (which starts a 2-process DDP run itself) on CPU only, one thread per process."""
    # keep the caller's PYTHONPATH (metalight may be importable only through it, as on a machine without
    # `pip install -e .`), and hide GPUs: the two processes compare CPU arithmetic
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, script, str(out_dir)], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_stops_with_one_line(cfg, caplog, run_dir: Path, expected: str) -> None:
    """Training `cfg` through the entry point train.py wraps (cli.run_reporting_errors) ends with one logged error line
    holding `expected`, exit status 2, and no file in run_dir but Hydra's."""
    from metalight.runs import cli
    from metalight.runs.training import train

    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(train, cfg)
    assert stopped.value.code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not [p for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts]
