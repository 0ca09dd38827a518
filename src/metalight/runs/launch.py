"""Keeps Lightning's DDP re-launch of train.py inside the run folder Hydra already made."""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write


def pin_hydra_for_ddp_children() -> None:
    """Make DDP child processes reuse this run's folder and overrides, even under `-m`.

    Lightning re-runs `sys.argv` for ranks > 0 with `hydra.run.dir=<HydraConfig.run.dir>`. Left alone,
    that re-evaluates `${now:...}` (a second later: a new, scattered run folder) and, in a multirun,
    replays the whole sweep in every child. Pinning run.dir to the real output folder and argv to this
    job's own overrides makes each child join exactly this job.
    """
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
