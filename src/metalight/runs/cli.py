"""Turns user-facing errors into one clear message and a non-zero exit, instead of a long traceback."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from metalight.runs.checkpoint_io import write_text_atomically
from metalight.errors import MetalightError

T = TypeVar("T")
log = logging.getLogger("metalight")

# A DDP process that stops on one of our errors leaves its message here, in the run folder all processes
# share, so that the others, which then fail in a collective, end with the same line instead of a traceback.
ERROR_FILE = ".process_error"
# how long a process whose collective broke looks for that message (a slow shared file system)
ERROR_WAIT_S = 3.0


def run_reporting_errors(function: Callable[..., T], *args: Any) -> T:
    """Call `function`; a MetalightError becomes one logged line and exit status 2, on every DDP process.

    In a multirun the error is re-raised instead, so Hydra records the job as failed and the
    sweep's summary shows it, while the other jobs still run.
    """
    started = time.time()
    try:
        return function(*args)
    except MetalightError as error:
        if _multirun():
            raise
        message = f"{type(error).__name__}: {error}"
        _leave_for_other_processes(message)
        log.error("%s", message)
        _remove_run_folder_if_empty()
        raise SystemExit(2) from None
    except Exception:
        message = None if _multirun() else _message_of_another_process(started)
        if message is None:
            raise  # a failure of its own: the traceback is what a developer needs
        log.error("%s", message)
        raise SystemExit(2) from None


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_run_folder_if_empty() -> None:
    """Remove this run's folder when it holds only what Hydra wrote before the error (.hydra/ and the log).

    A run stopped by a bad input then leaves nothing behind but its one line; a folder with anything the
    run made (checkpoints, event files, results) is kept. DDP runs keep theirs: the other processes
    read the message from it.
    """
    if _world_size() > 1 or not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.is_dir() and all(path.name == ".hydra" or path.suffix == ".log" for path in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _world_size() -> int:
    """Processes of this run that talk to each other (1 outside DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _error_file() -> Path | None:
    """<run folder>/ERROR_FILE when Hydra made the run folder and this process is one of several."""
    if _world_size() < 2 or not HydraConfig.initialized():
        return None
    folder = Path(HydraConfig.get().runtime.output_dir)
    return folder / ERROR_FILE if folder.is_dir() else None


def _leave_for_other_processes(message: str) -> None:
    """Write `message` where the other processes of this DDP run look when their next collective breaks."""
    path = _error_file()
    if path is not None:
        try:
            write_text_atomically(path, message)
        except OSError:
            pass  # the message is still logged here


def _message_of_another_process(started: float) -> str | None:
    """The message another process of this run left since `started`, waiting up to ERROR_WAIT_S for it."""
    path = _error_file()
    if path is None:
        return None
    deadline = time.monotonic() + ERROR_WAIT_S
    while True:
        try:
            if path.stat().st_mtime >= started - 1.0:  # not a message of an earlier job in this folder
                return path.read_text()
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
