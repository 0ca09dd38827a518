"""Turns user-facing errors into one clear message and a non-zero exit, instead of a long traceback."""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from metalight.errors import MetalightError

T = TypeVar("T")
log = logging.getLogger("metalight")


def run_reporting_errors(function: Callable[..., T], *args: Any) -> T:
    """Call `function`; a MetalightError becomes one logged line and exit status 2.

    In a multirun the error is re-raised instead, so Hydra records the job as failed and the
    sweep's summary shows it, while the other jobs still run.
    """
    try:
        return function(*args)
    except MetalightError as error:
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun:
            raise
        log.error("%s: %s", type(error).__name__, error)
        raise SystemExit(2) from None
