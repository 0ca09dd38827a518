"""Writing a run's files safely: atomic checkpoint writes, and a clear early error when a folder or disk can't take them."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from metalight.errors import CheckpointError, ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes beside the target, fsyncs, then renames over it: old file or new, never half.

    Lightning's own local writer stages the file in the system temp folder and moves it into place, which is a
    copy (truncate, then write) when that folder is on another disk, and nothing is fsynced: a crash or a full
    disk then leaves a truncated last.ckpt. Here the temporary file lives in the checkpoint's own folder, so
    os.replace is one atomic rename. URLs (s3://...) keep Lightning's fsspec writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Replace `path` by `checkpoint` in one step; on failure leave the previous file as it was."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r}).")
        target = Path(path)
        temporary: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            # like open(..., "wb") (permissions from the umask, unlike mkstemp's 0600), but never an existing file
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
            temporary = None
            _fsync_directory(target.parent)
        except OSError as error:
            raise CheckpointError(_write_error_message(target, error)) from error
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _write_error_message(target: Path, error: OSError) -> str:
    """What went wrong writing checkpoint `target`, that the old file is intact, and what to do."""
    kept = f"the previous {target.name} there is intact" if target.exists() else f"no {target.name} was written"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device (or quota exceeded) while writing checkpoint {target}; {kept}. "
            "Free some space, or move the run to a larger disk with paths.log_dir=..., then resume with "
            f"ckpt_path={target.parent.parent}."
        )
    return (
        f"cannot write checkpoint {target} ({error.strerror or error}); {kept}. "
        "Set paths.log_dir to a folder you can write, or fix the permissions of that folder."
    )


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Have write(temporary) fill a temporary file beside `path`, then rename it over `path`: readers never see half
    of it, and a failed write leaves neither a partial file nor the temporary one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a small text file (JSON, CSV) atomically (write_atomically)."""
    write_atomically(path, lambda temporary: temporary.write_text(text))


def ensure_writable(directory: str | Path, setting: str = "paths.log_dir") -> Path:
    """Create `directory` if needed and prove a file can be written in it; ConfigError naming it and the fix if not."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise ConfigError(
            f"cannot write to {directory} ({error.strerror or error}): a run keeps its config, logs and checkpoints "
            f"there. Set {setting}=/a/folder/you/can/write, or free space on that disk."
        ) from None
    return directory


class CheckOutputWritable(Callback):
    """Hydra callback: one clear line and exit status 2, before Hydra makes the run or sweep folder, if it can't be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check hydra.run.dir of a single run."""
        _check_or_exit(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check hydra.sweep.dir of a sweep."""
        _check_or_exit(config.hydra.sweep.dir)


def _check_or_exit(directory: str) -> None:
    """ensure_writable, turning its error into a message on stderr and exit status 2 (Hydra would print a traceback)."""
    try:
        ensure_writable(directory)
    except ConfigError as error:
        print(f"ConfigError: {error}", file=sys.stderr)
        raise SystemExit(2) from None
