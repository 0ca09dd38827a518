"""Training from a composed config: build() makes every object (evaluation reuses it), train() fits and tests."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metalight.runs.checkpoint_io import ensure_writable
from metalight.runs.checkpoints import load_checkpoint, resolve_checkpoint
from metalight.runs.config import validate_config
from metalight.runs.learner_swap import command_line, fit_experiment_to_learner
from metalight.errors import ConfigError, MetalightError
from metalight.runs.sweep_summary import record_results, run_results

log = logging.getLogger(__name__)


def _instantiate(node: DictConfig, group: str = "", **kwargs: Any) -> Any:
    """hydra.utils.instantiate, letting our own errors through unwrapped and naming a key the target does not take (one clear line)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, MetalightError):
            raise error.__cause__ from None
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error.__cause__))
        if group and isinstance(error.__cause__, TypeError) and unexpected:
            key = f"{group}.{unexpected[1]}"
            raise ConfigError(
                f"{key} is not an option of {node.get('_target_')}: remove it (`~{key}`). An experiment= file written for "
                f"another {group} may set it: use the experiment made for this one (conf/experiment/, e.g. quick_omniglot_<algo>)."
            ) from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every `_target_` entry of a callbacks/logger group (a dict of named configs)."""
    if not group:
        return []
    return [_instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build_data_and_algorithm(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The datamodule (not yet set up) and the algorithm with its model (seeded), from a composed config: what a trained learner needs."""
    fit_experiment_to_learner(cfg, command_line(cfg))
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data, "data", _recursive_=False)  # it builds data.train_augment itself, naming a bad entry
    algorithm = _instantiate(cfg.algo, "algo", model=_instantiate(cfg.model, "model"))
    algorithm.use_task_kind(datamodule.kind)  # the task interface: the data's loss and metric, or a clear refusal
    if callable(getattr(datamodule, "check_learner", None)):  # data that needs more of a learner (GrBAL: a dynamics model)
        datamodule.check_learner(algorithm)
    monitored = OmegaConf.select(cfg, "monitor.metric")
    # a data module may score its runs by more than the learner's metric (the dynamics tasks: the controller's return)
    if monitored is not None and monitored not in (algorithm.metric, *getattr(datamodule, "run_metrics", ())):
        raise ConfigError(
            f"monitor.metric={monitored} but {datamodule.kind.name} tasks are scored by {algorithm.metric}: set "
            f"monitor.metric={algorithm.metric} monitor.mode={'max' if datamodule.kind.higher_is_better else 'min'} "
            "(the data configs of each kind set both)."
        )
    return datamodule, algorithm


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, algorithm, callbacks, loggers and trainer from a composed config."""
    datamodule, algorithm = build_data_and_algorithm(cfg)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"cfg": cfg, "datamodule": datamodule, "algorithm": algorithm, "trainer": trainer}


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's latest logged values as plain floats."""
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (optionally resuming from cfg.ckpt_path), then test the best checkpoint; return metrics and objects."""
    started = time.perf_counter()
    ensure_writable(cfg.paths.output_dir)
    ckpt_path = _checkpoint_to_resume(cfg)
    objects = build(cfg)
    trainer, algorithm, datamodule = objects["trainer"], objects["algorithm"], objects["datamodule"]
    _check_data_first(trainer, datamodule)
    for logger in trainer.loggers:
        logger.log_hyperparams(cfg_to_hparams(cfg))

    if cfg.get("train", True):
        trainer.fit(algorithm, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _metrics(trainer)

    if cfg.get("test", True):
        trainer.test(algorithm, datamodule=datamodule, ckpt_path=checkpoint_to_test(trainer, datamodule), weights_only=True)
        metrics.update(_metrics(trainer))
    metric = algorithm.metric
    results = run_results(trainer, metrics, metric) | {"wall_time_s": round(time.perf_counter() - started, 1)}
    record_results(trainer, cfg.paths.output_dir, results)
    if results[f"best_val_{metric}"] is not None:
        metrics[f"val/{metric}_best"] = results[f"best_val_{metric}"]  # what hparams_search/* optimizes
    if trainer.is_global_zero:
        log.info("Run folder: %s (TensorBoard: tensorboard --logdir %s)", cfg.paths.output_dir, cfg.paths.log_dir)
    return metrics, objects


def checkpoint_to_test(trainer: pl.Trainer, datamodule: pl.LightningDataModule) -> str | None:
    """The best checkpoint by validation, or None (the weights in memory, the last ones) when there is none or
    when validation classes trained too (data.train_on_val), so that the best by validation is no held-out choice."""
    if getattr(datamodule, "train_on_val", False):
        log.info("data.train_on_val=true: testing the last weights, not the best by validation (validation classes trained too).")
        return None
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("No best checkpoint was saved: testing the weights in memory.")
    return best or None


def _check_data_first(trainer: pl.Trainer, datamodule: pl.LightningDataModule) -> None:
    """Prepare and set up the data in this process before anything is logged or another process starts.

    A missing data folder or a task too large for a split then ends the run with our one-line error
    before it writes event files (so cli removes its empty run folder), and before Lightning starts the
    other DDP processes, which would otherwise end with a broken-connection traceback. fit() then finds
    the data set up (setup keeps what it loaded; the cache makes preparing again cheap). Processes
    started by torchrun or SLURM skip it: each of them runs this function, and Lightning prepares the
    data on one process per node; cli.run_reporting_errors covers them.
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally and trainer.world_size > 1:
        return
    datamodule.prepare_data()
    datamodule.setup("fit")


def _checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint fit() continues from: cfg.ckpt_path, else this run folder's own last.ckpt (a requeued job), else None.

    cfg.ckpt_path may be a file, a run folder, or "last" (the newest run of this task_name).
    """
    if cfg.get("ckpt_path") is not None:
        path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir) / cfg.task_name / "runs")
    else:
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
        log.info("Resuming from %s: this run folder already holds a last.ckpt (a restarted job).", path)
    load_checkpoint(path)  # a missing, truncated or foreign file fails here, naming it, before anything is built
    return str(path)


def cfg_to_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The composed config flattened to `group/key` scalars, as TensorBoard's hparams view wants them."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else str(key), value)
        elif isinstance(node, (int, float, str, bool)) or node is None:
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    for key in cfg:
        if key not in ("hydra", "paths"):
            visit(str(key), OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key])
    return flat
