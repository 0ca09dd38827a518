"""A train.py run killed with SIGKILL and resumed with ckpt_path=last ends with the very parameters of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metalight.checkpoints import load_checkpoint
from metalight.errors import CheckpointError
from metalight.training import train

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
# a small network and small tasks keep a meta-step near 0.1 s on a CPU
TINY = [
    f"trainer.max_steps={MAX_STEPS}", "data.batches_per_epoch=4", "data.meta_batch_size=2", "data.k_query=2",
    "data.n_val_tasks=2", "data.eval_batch_size=2", "model.hidden=8", "algo.eval_inner_steps=1", "data.num_workers=0",
    "data.persistent_workers=false", "++trainer.enable_progress_bar=false", "callbacks.last_checkpoint.every_n_steps=1",
    "logger=csv", "test=false", "trainer.accelerator=cpu",  # exact resume is a CPU promise
]


def _command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", *TINY, *overrides]


def _env(data_dir: Path, cache_dir: Path) -> dict:
    # one thread per process: faster on a small shared machine, and the same reductions in every run; GPUs hidden
    return dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _last(tmp_path: Path, task_name: str) -> Path:
    (path,) = (tmp_path / "logs" / task_name / "runs").glob("*/checkpoints/last.ckpt")
    return path


def _step(path: Path) -> int:
    """global_step of a checkpoint that may be replaced while we read it (atomic writes make that safe)."""
    try:
        return load_checkpoint(path)["global_step"]
    except (CheckpointError, FileNotFoundError):
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, cache_dir):
    env = _env(data_dir, cache_dir)
    reference = subprocess.run(_command(tmp_path, "task_name=reference"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]

    job = subprocess.Popen(_command(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs, deadline = tmp_path / "logs" / "train" / "runs", time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        if any(_step(path) >= 2 for path in runs.glob("*/checkpoints/last.ckpt")):
            break
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # no handler runs: whatever was on disk is all there is
    job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {job.returncode}"
    killed_at = _step(_last(tmp_path, "train"))
    assert 2 <= killed_at < MAX_STEPS

    resumed = subprocess.run(_command(tmp_path, "ckpt_path=last"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    newest = max(runs.glob("*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    expected, got = load_checkpoint(_last(tmp_path, "reference")), load_checkpoint(newest)
    assert got["global_step"] == expected["global_step"] == MAX_STEPS
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][name]), f"{name} differs after resuming from step {killed_at}"


@pytest.mark.parametrize("content, expected", [(None, "does not exist"), (b"PK\x03\x04trunc", "cannot be read"), ("foreign", "not written by a metalight run")])
def test_bad_checkpoint_fails_before_training_naming_the_file(compose_train, tmp_path, content, expected):
    path = tmp_path / "given.ckpt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as raised:
        train(compose_train(f"ckpt_path={path}"))
    assert str(path) in str(raised.value)


def test_ckpt_path_last_without_runs_says_what_to_pass(compose_train):
    with pytest.raises(CheckpointError, match="ckpt_path=last"):
        train(compose_train("ckpt_path=last"))
