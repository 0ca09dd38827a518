"""An experiment run with another learner than its own (`python train.py experiment=quick_sinusoid algo=reptile`).

An experiment file tunes the learner it picks: `algo.inner_lr` for MAML, `algo.optimizer.lr` for an Adam the
learner may not have. Swapping the learner on the command line keeps those keys, and the new learner would stop
the run on a key it does not take. Here the experiment's keys that the chosen learner does not take are left
out, with a warning that names them, so the run goes on with the learner's own defaults for them; a key set on
the command line is never left out (the learner refuses it in one line, naming it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# the optimizer and scheduler are partials built by the learner: a node without `_target_` only changes a
# learner's own partial, and is meaningless (not callable) for a learner whose default is null
_PARTIALS = ("optimizer", "scheduler")
# MAML++'s epoch-long phases, which a quick experiment's shorter run cannot hold
_EPOCH_PHASES = (("msl", "msl_epochs"), ("da", "da_epochs"))


def command_line(cfg: DictConfig) -> list[str]:
    """The run's command-line overrides: cfg.hydra.overrides.task when composed with it, else the running Hydra job's."""
    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if overrides is None and HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
    return [str(item) for item in overrides or []]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _accepted(target: str) -> set[str] | None:
    """Keyword arguments the learner class takes (through the **options a subclass hands its base), or None when unknown."""
    try:
        mro = get_class(target).__mro__
    except (ImportError, ValueError, AttributeError):
        return None
    names: set[str] = set()
    for klass in mro:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return None


def fit_experiment_to_learner(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """Leave out of cfg.algo the experiment's keys the command line's learner does not take; return them (warned).

    Acts only when the command line names both an experiment and a learner (algo=...). Besides keys the learner's
    class does not take, it leaves out optimizer/scheduler nodes without `_target_` (an experiment's
    `optimizer.lr` over a learner whose optimizer is null) and shortens MAML++'s msl/da phases to the run.
    """
    keys = {_key(item) for item in overrides}
    algo = cfg.get("algo")
    if not {"experiment", "algo"} <= keys or not isinstance(algo, DictConfig) or not isinstance(algo.get("_target_"), str):
        return []
    accepted = _accepted(algo._target_)
    dropped: list[str] = []
    with open_dict(cfg):
        for name in list(algo.keys()):
            if str(name).startswith("_") or f"algo.{name}" in keys:
                continue
            node = algo.get(name)
            if accepted is not None and name not in accepted:
                del algo[name]
                dropped.append(f"algo.{name}")
            elif name in _PARTIALS and isinstance(node, DictConfig) and "_target_" not in node and not any(k.startswith(f"algo.{name}.") for k in keys):
                algo[name] = None
                dropped.append(f"algo.{name}")
        steps, per_epoch = OmegaConf.select(cfg, "trainer.max_steps"), OmegaConf.select(cfg, "data.batches_per_epoch")
        if isinstance(steps, int) and steps > 0 and isinstance(per_epoch, int) and per_epoch > 0:
            epochs = -(-steps // per_epoch)
            for switch, name in _EPOCH_PHASES:
                value = algo.get(name)
                if algo.get(switch) is True and isinstance(value, int) and value > epochs and f"algo.{name}" not in keys:
                    algo[name] = epochs
                    dropped.append(f"algo.{name} (shortened from {value} to the run's {epochs} epochs)")
    if dropped:
        log.warning(
            "experiment= was written for another learner than %s: left out %s (the learner's own defaults apply). "
            "Set a key on the command line to keep it.", algo._target_, ", ".join(dropped),
        )
    return dropped
