"""Stopping a run at any meta-step and continuing it exactly: last.ckpt every N steps and on SIGTERM, per-step seeds.

A resumed run ends with the same parameters as an uninterrupted one because everything a meta-step draws
is a function of where it is: the tasks of meta-step g of epoch e come from (seed, e, g) (the data module
restarts its sampler at the restored loop position), and the global random generators are reseeded from
(seed, step, rank) right before each meta-step, so nothing depends on what ran in between (validation,
a new DataLoader iterator) or on random states that would have to be pickled into the checkpoint.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metalight.errors import ConfigError

log = logging.getLogger(__name__)


class LastCheckpoint(Callback):
    """Keep `<dirpath>/last.ckpt` current: every `every_n_steps` meta-steps, when training ends, and on SIGTERM.

    SIGTERM is what SLURM (and most schedulers) send before pre-empting or cancelling a job. While training,
    this callback's handler only notes it (and passes it on to the DDP processes this one started); after
    the running meta-step the ranks agree on it in one all-reduce, all save last.ckpt at the same point and
    stop with Lightning's SIGTERMException, and the process exits with status 0. Lightning 2.6's own handler
    broadcasts from inside the signal handler, which can interleave with the training loop's collectives
    and hang a DDP job, so it is replaced for the duration of training. Start the job again in the same
    run folder (a requeued job) and it continues from last.ckpt, or pass ckpt_path=<that file>.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 100, filename: str = "last.ckpt") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_steps={every_n_steps!r} is not valid: it must be a whole number "
                ">= 0 (0 saves only when training ends and on SIGTERM), e.g. callbacks.last_checkpoint.every_n_steps=100."
            )
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self._saved_step: int | None = None
        self._sigterm = False
        self._launcher: Any = None

    def _save(self, trainer: pl.Trainer) -> None:
        """Write the checkpoint of the trainer's current state (every rank calls this; rank 0 writes)."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, loops, callbacks
        self._saved_step = trainer.global_step

    def _note_sigterm(self, signum: int, frame: Any) -> None:
        """Signal handler: remember the request and forward it to the DDP processes this one launched."""
        if not self._sigterm and self._launcher is not None:
            self._launcher.kill(signum)
        self._sigterm = True

    def _sigterm_on_any_rank(self, trainer: pl.Trainer) -> bool:
        """Whether any process got SIGTERM (one all-reduce of a flag, at the same point on every rank)."""
        flag = torch.tensor(float(self._sigterm), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def _announce(self, trainer: pl.Trainer) -> None:
        """Say where training stopped and how to continue."""
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: stopped after meta-step %d and saved %s. Resume with ckpt_path=%s "
                "(a job restarted in this run folder resumes by itself).",
                trainer.global_step, self.path, self.path,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over SIGTERM until fit() ends (Lightning then restores the handlers it found)."""
        self._sigterm, self._launcher = False, trainer.strategy.launcher
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Save after every `every_n_steps`-th meta-step, after the last one (max_steps), and stop on SIGTERM."""
        stop = self._sigterm_on_any_rank(trainer)
        step = trainer.global_step
        if stop or (self.every_n_steps and step % self.every_n_steps == 0) or step == trainer.max_steps:
            self._save(trainer)
        if stop:
            self._announce(trainer)
            raise SIGTERMException()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final state when training ended another way (max_epochs, early stopping).

        At max_steps the save happens in on_train_batch_end instead: by now Lightning has marked the
        unfinished epoch as done, and a longer run resumed from here would skip the rest of that epoch.
        """
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM that Lightning's own handler caught (before training started): save if not saved yet."""
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING and self._saved_step != trainer.global_step:
            self._save(trainer)
            self._announce(trainer)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The 32-bit seed of meta-step `step` on process `rank` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class StepSeed(Callback):
    """Reseed Python, NumPy and torch (all devices) before every meta-step from (seed, step, rank).

    Without it, a resumed run's generators would continue from wherever the restore left them, not from
    where the interrupted run stood at that step.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Seed the generators for the meta-step about to run."""
        value = step_seed(self.seed, trainer.global_step, trainer.global_rank)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)
