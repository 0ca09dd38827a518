"""Evaluate a trained checkpoint on the fixed test tasks with the config of the run that wrote it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import torch
import torch.nn.functional as F

from metalight.algorithms.base import mean_and_ci95
from metalight.runs.checkpoint_io import write_text_atomically
from metalight.runs.checkpoints import best_checkpoints, load_checkpoint, load_weights, resolve_checkpoint, run_dir_of, saved_run_config
from metalight.errors import ConfigError
from metalight.apply.fixed_episodes import evaluate_episodes
from metalight.runs.training import build
from metalight.visualization.video import attach_recorder, check_rendering, video_options, write_videos

log = logging.getLogger(__name__)

# what a checkpoint's run decides (restored) versus what this evaluation decides (taken from eval's config)
RUN_GROUPS = ("data", "model", "algo")
EVAL_GROUPS = ("trainer", "logger", "callbacks", "paths")


def _overrides() -> list[str]:
    """This job's command-line overrides, as given (key=value, with any +/~ prefix)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _key(override: str) -> str:
    """The config key of a command-line override (no +/~ prefix, no value)."""
    return override.split("=", 1)[0].lstrip("~+")


def run_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what is measured: data/model/algo keys (a 20-way test of a 5-way run, 1 query per class)."""
    return [item.lstrip("+") for item in overrides if _key(item).split(".")[0] in RUN_GROUPS]


def results_path(folder: Path, stem: str, kind: str, overrides: list[str]) -> Path:
    """folder/<stem>.<kind>.json, or <stem>.<overrides>.<kind>.json when data/model/algo keys were overridden, so that
    each setting a checkpoint is scored in keeps its own file (the overrides, made filename-safe, name it)."""
    if not overrides:
        return folder / f"{stem}.{kind}.json"
    tag = re.sub(r"[^A-Za-z0-9._=,+~-]", "_", ",".join(overrides))
    if len(tag) > 120:  # a long command line: its start, and a digest that tells it from others
        tag = f"{tag[:100]}-{hashlib.sha1(tag.encode()).hexdigest()[:10]}"
    return folder / f"{stem}.{tag}.{kind}.json"


def restore_run_config(checkpoint_path: Path, eval_cfg: DictConfig, override_keys: list[str]) -> DictConfig:
    """The run's composed config, with this machine's paths/trainer and the command line's data/model/algo overrides."""
    run_cfg = saved_run_config(checkpoint_path)
    with open_dict(run_cfg):
        run_callbacks = run_cfg.get("callbacks") or {}
        for group in EVAL_GROUPS:
            run_cfg[group] = eval_cfg[group]
        # a callback the run's data config adds (data=dynamics: ControllerEvaluation, the controller's return on held-out
        # bodies) is part of what its test measures: kept (this machine's callbacks are the defaults)
        if run_cfg.get("callbacks") is not None:
            for name, callback in run_callbacks.items():
                if name not in run_cfg.callbacks:
                    run_cfg.callbacks[name] = callback
        for key in override_keys:
            if key in ("ckpt_path", "task_name") or key.startswith("hydra.") or key.split(".")[0] in EVAL_GROUPS:
                continue
            if key in ("experiment", "debug"):
                raise ConfigError(f"eval.py takes no {key}=...: override single keys instead, e.g. data.n_test_tasks=600.")
            if key in RUN_GROUPS:
                run_cfg[key] = eval_cfg[key]
            else:
                OmegaConf.update(run_cfg, key, OmegaConf.select(eval_cfg, key), force_add=True)
        if "monitor" not in run_cfg:  # a run from before regression tasks: judged by val/acc
            run_cfg.monitor = eval_cfg.monitor
        run_cfg.task_name = eval_cfg.task_name
        run_cfg.ckpt_path = str(checkpoint_path)
    return run_cfg


def ensemble_results(outputs: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, Any]:
    """Accuracy ± 95% CI over tasks of the members' averaged final query logits (the MAML++ authors average logits).

    outputs[m] is member m's (logits [B, N*Q, N], labels [B, N*Q]) per test batch, the same tasks in the same order.
    """
    logits = torch.stack([torch.cat([lg for lg, _ in member]) for member in outputs]).double().mean(dim=0)
    labels = torch.cat([y for _, y in outputs[0]])
    accs = (logits.argmax(-1) == labels).double().mean(dim=1)
    acc, acc_ci95 = mean_and_ci95(float(accs.sum()), float((accs**2).sum()), len(accs))
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    return {"acc": acc, "acc_ci95": acc_ci95, "loss": loss, "n_tasks": len(accs)}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score `cfg.ckpt_path` (or the ensemble of its run's ensemble_top_k best checkpoints) on the fixed test tasks, or on cfg.episodes; save and return the results.

    With video.tasks > 0 (a HalfCheetah run), also render the test's episodes of its first video.tasks tasks
    after the inner steps video.steps into <run>/videos/<checkpoint>/task<i>_step<k>.gif (a GrBAL run: its first
    held-out bodies without and with online adaptation, body<i>_unadapted.gif and body<i>_adapted.gif), listed in the results.
    """
    top_k = cfg.get("ensemble_top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"ensemble_top_k={top_k!r} is not valid: use a whole number >= 1 (1 = the checkpoint alone, 5 = MAML++'s ensembles).")
    runs_dir = Path(cfg.paths.log_dir) / "train" / "runs"
    checkpoint_path = resolve_checkpoint(cfg.ckpt_path, runs_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    overrides = _overrides()
    run_cfg = restore_run_config(checkpoint_path, cfg, [_key(item) for item in overrides])
    measured_with = run_overrides(overrides)
    video = video_options(cfg.get("video"), run_cfg)
    if video is not None:
        check_rendering(video, run_cfg.data.env)  # before anything runs: no OpenGL is one line, not a failure after the test
    objects = build(run_cfg)
    algorithm, trainer = objects["algorithm"], objects["trainer"]
    metric = algorithm.metric
    if metric != "acc" and (cfg.get("episodes") or top_k != 1):
        raise ConfigError(f"episodes= and ensemble_top_k > 1 score classification runs; this run's tasks are scored by {metric}: drop them.")
    recorder = None
    if video is not None:
        if trainer.world_size > 1:
            raise ConfigError("video.tasks renders the test's episodes in one process: set trainer.devices=1.")
        eval_steps = None if video.controller else algorithm.eval_loop.steps  # a GrBAL run's steps are its two episodes, checked already
        if eval_steps is not None and max(video.steps) > eval_steps:
            raise ConfigError(f"video.steps={list(video.steps)}: the test adapts {eval_steps} steps (algo.eval_inner_steps={eval_steps}): use steps in 0..{eval_steps}.")
        recorder = attach_recorder(trainer, video)
    if cfg.get("episodes"):
        if top_k != 1 or trainer.world_size > 1:
            raise ConfigError(f"episodes={cfg.episodes} scores one checkpoint in one process: drop ensemble_top_k, set trainer.devices=1.")
        load_weights(algorithm, checkpoint, checkpoint_path)
        results, kind = evaluate_episodes(cfg, objects, checkpoint, checkpoint_path)
        out = results_path(checkpoint_path.parent, checkpoint_path.stem, kind, measured_with)
    elif top_k == 1:
        load_weights(algorithm, checkpoint, checkpoint_path)
        trainer.test(algorithm, datamodule=objects["datamodule"], verbose=False)
        results = {"checkpoint": str(checkpoint_path), "global_step": checkpoint.get("global_step"), **algorithm.test_results}
        out = results_path(checkpoint_path.parent, checkpoint_path.stem, "test", measured_with)
        if recorder is not None:
            trainer.callbacks.remove(recorder)
            results["videos"] = write_videos(recorder, video, run_dir_of(checkpoint_path) / "videos" / checkpoint_path.stem, run_cfg.data.env)
    else:
        if trainer.world_size > 1:
            raise ConfigError("ensemble_top_k > 1 evaluates in one process: set trainer.devices=1.")
        members = best_checkpoints(checkpoint_path.parent, top_k)
        algorithm.keep_test_logits = True
        outputs, member_accs = [], []
        for path in members:
            load_weights(algorithm, load_checkpoint(path), path)
            trainer.test(algorithm, datamodule=objects["datamodule"], verbose=False)
            outputs.append(algorithm.test_outputs)
            member_accs.append(algorithm.test_results["acc"])
        results = {"members": [str(p) for p in members], "member_accs": member_accs, **ensemble_results(outputs)}
        out = results_path(checkpoint_path.parent, f"top{top_k}", "test", measured_with)
    if not cfg.get("episodes"):
        results["n_test_tasks"] = run_cfg.data.n_test_tasks
    results["overrides"] = measured_with
    write_text_atomically(out, json.dumps(results, indent=2))
    log.info(
        "test %s %.4f ± %.4f (95%% CI, %d tasks)%s; saved %s",
        "accuracy" if metric == "acc" else metric, results[metric], results[f"{metric}_ci95"], results["n_tasks"],
        f", before adaptation {results[f'{metric}_before']:.4f}" if f"{metric}_before" in results else "", out,
    )
    return results
