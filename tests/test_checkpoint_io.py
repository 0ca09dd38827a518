"""Checkpoint writes are atomic (a crash or a full disk keeps the previous file), and unwritable folders fail clearly."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from metalight.runs import checkpoint_io
from metalight.runs.checkpoint_io import AtomicCheckpointIO, ensure_writable
from metalight.runs.checkpoints import load_checkpoint
from metalight.errors import CheckpointError, ConfigError



def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "hyper_parameters": {}, "global_step": int(value)}


def _write_partially_then(failure: BaseException):
    """A torch.save stand-in that writes some bytes to the file, then fails like a full disk or a crash."""

    def save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise failure

    return save


def test_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), target)
    io.save_checkpoint(_checkpoint(2), target)
    assert load_checkpoint(target)["global_step"] == 2
    assert os.listdir(target.parent) == ["last.ckpt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), target)
    monkeypatch.setattr(checkpoint_io.torch, "save", _write_partially_then(OSError(code, os.strerror(code))))
    with pytest.raises(CheckpointError) as raised:
        io.save_checkpoint(_checkpoint(2), target)
    message = str(raised.value)
    assert str(target) in message and "intact" in message
    assert ("no space left" in message) == (code == errno.ENOSPC)
    assert load_checkpoint(target)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), target)
    monkeypatch.setattr(checkpoint_io.torch, "save", _write_partially_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_checkpoint(2), target)
    assert load_checkpoint(target)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


CRASH_MID_WRITE = """
import os, sys, torch
from metalight.runs import checkpoint_io
def save(obj, file, *args, **kwargs):
    file.write(b"PK half a checkpoint")
    file.flush()
    os._exit(9)  # the process dies mid-write: no exception handler, no cleanup
checkpoint_io.torch.save = save
checkpoint_io.AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "hyper_parameters": {}}, sys.argv[1])
"""


def test_process_killed_mid_write_leaves_previous_checkpoint_valid(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), target)
    result = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    assert load_checkpoint(target)["global_step"] == 1
    # the half-written temporary is a hidden file beside it, never picked up as a checkpoint
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]


def test_ensure_writable_names_the_folder_and_the_setting(tmp_path):
    ensure_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"paths\.log_dir") as raised:
        ensure_writable(blocker / "logs")
    assert str(blocker / "logs") in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_ensure_writable_rejects_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="cannot write"):
        ensure_writable(locked / "run")


def test_cli_unwritable_log_dir_is_one_clear_line(tmp_path, train_py_in_process):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status, output = train_py_in_process(tmp_path, blocker / "logs", "debug=fast_dev_run")
    assert status == 2, output[-2000:]
    assert "cannot write to" in output and "paths.log_dir" in output and str(blocker) in output
    assert "Traceback" not in output
