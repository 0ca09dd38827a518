"""The train and evaluate entry points: plain functions of a composed config, called by train.py/eval.py and the tests."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from metalight.config import validate_config

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every `_target_` entry of a callbacks/logger group (a dict of named configs)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, algorithm, callbacks, loggers and trainer from a composed config."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    algorithm = instantiate(cfg.algo, model=instantiate(cfg.model))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"cfg": cfg, "datamodule": datamodule, "algorithm": algorithm, "trainer": trainer}


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's latest logged values as plain floats."""
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (optionally resuming from cfg.ckpt_path), then test the best checkpoint; return metrics and objects."""
    objects = build(cfg)
    trainer, algorithm, datamodule = objects["trainer"], objects["algorithm"], objects["datamodule"]
    for logger in trainer.loggers:
        logger.log_hyperparams(cfg_to_hparams(cfg))

    if cfg.get("train", True):
        trainer.fit(algorithm, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _metrics(trainer)

    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved: testing the weights in memory.")
        trainer.test(algorithm, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update(_metrics(trainer))
    return metrics, objects


def cfg_to_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The composed config flattened to `group/key` scalars, as TensorBoard's hparams view wants them."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else str(key), value)
        elif isinstance(node, (int, float, str, bool)) or node is None:
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    visit("", OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    return {k: v for k, v in flat.items() if not k.startswith(("paths/", "hydra/"))}
