"""SIGTERM saves last.ckpt and stops cleanly; a run resumed from any step's checkpoint ends exactly where it would have.

The in-process tests use tiny stand-ins (a linear model under manual optimization that draws random numbers
in training and validation, and an episode-like stream keyed by (epoch, index)) so they run in seconds; the
subprocess test sends SIGTERM to a real `python train.py`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from metalight.runs.checkpoint_io import AtomicCheckpointIO
from metalight.runs.checkpoints import load_checkpoint
from metalight.tasks.samplers import EvalTaskSampler, TrainTaskSampler
from metalight.errors import ConfigError
from metalight.runs.preemption import LastCheckpoint, StepSeed, step_seed

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BATCHES_PER_EPOCH = 3


class _Vectors(Dataset):
    """dataset[[(epoch, index), ...]]: one random vector per key, a pure function of the key."""

    def __getitem__(self, keys):
        return torch.stack([torch.from_numpy(np.random.default_rng([7, e, i]).standard_normal(4).astype("float32")) for e, i in keys])


class _Stream(pl.LightningDataModule):
    """Meta-batches of 2 keys, restarting at the loop position the trainer restored (as FewShotDataModule must)."""

    def train_dataloader(self):
        loop = self.trainer.fit_loop
        start = loop.epoch_loop.batch_progress.current.processed if loop.restarting else 0
        sampler = TrainTaskSampler(2, BATCHES_PER_EPOCH, epoch=loop.epoch_progress.current.processed, start=start)
        return DataLoader(_Vectors(), sampler=sampler, batch_size=None)

    def val_dataloader(self):
        return DataLoader(_Vectors(), sampler=EvalTaskSampler(4, 2), batch_size=None)


class _Learner(pl.LightningModule):
    """Manual optimization with noise from the global generator in training and validation alike."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = (self.layer(batch) + torch.rand(1)).pow(2).mean()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def validation_step(self, batch, batch_idx):
        torch.rand(3)  # validation draws too: the next meta-step must not depend on it
        self.log("val/acc", self.layer(batch).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class _SendSigterm(Callback):
    """Deliver SIGTERM to this process while meta-step `step` runs, as a scheduler would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class _KeepEveryStep(Callback):
    """Copy last.ckpt to step<k>.ckpt after each save, to resume from every step afterwards."""

    def __init__(self, last: Path):
        self.last = last

    def on_train_batch_end(self, trainer, *args):
        shutil.copy(self.last, self.last.with_name(f"step{trainer.global_step}.ckpt"))


def _fit(out: Path, max_steps: int, ckpt_path=None, extra=(), every_n_steps=1):
    pl.seed_everything(0)
    learner = _Learner()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        callbacks=[LastCheckpoint(out, every_n_steps=every_n_steps), StepSeed(seed=0), *extra],
    )
    trainer.fit(learner, datamodule=_Stream(), ckpt_path=ckpt_path, weights_only=True)
    return torch.cat([p.detach().flatten() for p in learner.parameters()]), trainer


@pytest.mark.parametrize("step", [2, BATCHES_PER_EPOCH])  # mid-epoch, and at an epoch end (after validation)
def test_sigterm_saves_and_resume_is_exact(tmp_path, step):
    reference, _ = _fit(tmp_path / "reference", max_steps=7)
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path / "stopped", max_steps=7, extra=[_SendSigterm(step)], every_n_steps=0)
    assert stopped.value.code in (None, 0)
    last = tmp_path / "stopped" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == step
    resumed, trainer = _fit(tmp_path / "stopped", max_steps=7, ckpt_path=last)
    assert trainer.global_step == 7
    assert torch.equal(resumed, reference)


def test_resume_from_any_step_is_exact(tmp_path):
    last = tmp_path / "run" / "last.ckpt"
    reference, _ = _fit(tmp_path / "run", max_steps=7, extra=[_KeepEveryStep(last)])
    for step in range(1, 7):
        resumed, _ = _fit(tmp_path / f"resumed{step}", max_steps=7, ckpt_path=last.with_name(f"step{step}.ckpt"))
        assert torch.equal(resumed, reference), f"resuming from step {step} diverged"


def test_final_checkpoint_continues_into_a_longer_run(tmp_path):
    reference, _ = _fit(tmp_path / "long", max_steps=7)
    _, short = _fit(tmp_path / "short", max_steps=4, every_n_steps=0)
    assert load_checkpoint(tmp_path / "short" / "last.ckpt")["global_step"] == 4
    longer, _ = _fit(tmp_path / "longer", max_steps=7, ckpt_path=tmp_path / "short" / "last.ckpt")
    assert torch.equal(longer, reference)


def test_step_seed_depends_on_seed_step_and_rank():
    seeds = {step_seed(seed, step, rank) for seed in (0, 1) for step in (0, 1) for rank in (0, 1)}
    assert len(seeds) == 8 and step_seed(3, 5, 1) == step_seed(3, 5, 1)


def test_bad_every_n_steps_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks\.last_checkpoint\.every_n_steps"):
        LastCheckpoint(tmp_path, every_n_steps=-1)


def _train_env(data_dir: Path, cache_dir: Path) -> dict:
    # trainer=ddp_cpu: CPU processes over gloo; GPUs hidden so that no rank touches CUDA (pinned memory, contexts)
    return dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.mark.slow
def test_sigterm_to_ddp_train_py_saves_and_the_requeued_job_resumes_exactly(tmp_path, data_dir, cache_dir):
    """Two DDP processes: SIGTERM to the main one (what SLURM sends) -> last.ckpt and exit 0; the same command
    started again in the same run folder (a requeued job) resumes and ends where an uninterrupted run ends.

    Reptile: besides the weights, its persistent inner Adam state (averaged over the ranks) must resume bit for bit.
    The uninterrupted reference run also shows that a DDP run of train.py, named by its timestamp, keeps one run
    folder (the second process finds the first's) with its config, TensorBoard events and checkpoint, and tests."""
    steps, env = 10, _train_env(data_dir, cache_dir)

    def command(*where: str) -> list[str]:
        return [
            sys.executable, str(ROOT / "train.py"), *where, "trainer=ddp_cpu", f"trainer.max_steps={steps}",
            "data.batches_per_epoch=4", "data.meta_batch_size=4", "data.k_query=2", "data.n_val_tasks=4", "data.n_test_tasks=4",
            "data.eval_batch_size=2", "model.hidden=8", "algo.eval_inner_steps=1", "data.num_workers=0",
            "data.persistent_workers=false", "++trainer.enable_progress_bar=false", "callbacks.last_checkpoint.every_n_steps=1",
            "algo=reptile", "algo.inner_steps=2",
        ]

    reference = subprocess.run(command(f"paths.log_dir={tmp_path / 'logs'}"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, f"DDP processes scattered run folders: {runs}"
    assert (runs[0] / ".hydra" / "config.yaml").is_file() and list((runs[0] / "tensorboard").glob("events.out.tfevents.*"))
    assert 0 <= json.loads((runs[0] / "results.json").read_text())["test_acc"] <= 1

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    job = subprocess.Popen(command(f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "test=false"), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output[-3000:]
    assert "SIGTERM: stopped after meta-step" in output, output[-3000:]
    stopped_at = load_checkpoint(last)["global_step"]
    assert 1 <= stopped_at < steps

    requeued = subprocess.run(command(f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "test=false"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, (requeued.stdout + requeued.stderr)[-3000:]
    assert f"Resuming from {last}" in requeued.stdout + requeued.stderr
    expected, got = load_checkpoint(runs[0] / "checkpoints" / "last.ckpt"), load_checkpoint(last)
    assert got["global_step"] == expected["global_step"] == steps
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][name]), f"{name} differs after resuming from step {stopped_at}"
    inner_expected, inner_got = expected["inner_optimizer_state"], got["inner_optimizer_state"]
    assert inner_got["step"] == inner_expected["step"] == steps * 2 * 2  # steps x tasks per rank x inner steps
    for part in ("m", "v"):
        for name, value in inner_expected[part].items():
            assert torch.equal(value, inner_got[part][name]), f"inner Adam {part} of {name} differs after resuming from step {stopped_at}"
