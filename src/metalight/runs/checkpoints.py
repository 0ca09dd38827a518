"""A run on disk: finding and opening its checkpoints, its saved config, weights and input format, with errors that name the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from metalight.errors import CheckpointError
from metalight.runs.learner_swap import fit_experiment_to_learner

if TYPE_CHECKING:  # types only: a run on disk is read before any algorithm or data module is built
    from metalight.algorithms.base import EpisodicModule
    from metalight.data.class_tasks import ClassTaskDataModule
    from metalight.data.preprocess import InputFormat

REQUIRED_KEYS = ("state_dict", "hyper_parameters")


def resolve_checkpoint(ckpt_path: str | Path, runs_dir: str | Path) -> Path:
    """Turn `ckpt_path` into a checkpoint file: a file, a run folder, or "last" (newest run's last.ckpt)."""
    if str(ckpt_path) == "last":
        candidates = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(
                f"ckpt_path=last: no run under {runs_dir} has checkpoints/last.ckpt. "
                "Give the checkpoint file itself: ckpt_path=/path/to/run/checkpoints/last.ckpt"
            )
        return candidates[-1]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Runs keep theirs in logs/<task_name>/runs/<time>/checkpoints/; "
            "pass one of those files (or the run folder) as ckpt_path=..."
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU (tensors and plain data only) and check it is one of ours."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "It is truncated or not a torch checkpoint: use another one, e.g. the run's last.ckpt or best checkpoint."
        ) from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} was not written by a metalight run (missing {', '.join(missing)}). "
            "Pass a checkpoint from logs/<task_name>/runs/<time>/checkpoints/."
        )
    return checkpoint


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run folder a checkpoint belongs to (the parent of its checkpoints/ folder)."""
    parent = checkpoint_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def monitored_score(checkpoint: dict[str, Any], path: Path, monitor: str = "val/acc") -> float | None:
    """The `monitor` value the ModelCheckpoint that wrote the file `path` kept it for; None for last.ckpt and other saves.

    A top-k checkpoint lists itself among its callback's best_k_models (by file name: the run folder may have moved).
    """
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("monitor") == monitor:
            for kept, score in (state.get("best_k_models") or {}).items():
                if Path(kept).name == path.name:
                    return float(score)
    return None


def best_checkpoints(folder: Path, k: int, monitor: str = "val/acc") -> list[Path]:
    """The k checkpoints of `folder` with the highest `monitor` score, best first; CheckpointError when there are fewer."""
    scored = []
    for path in sorted(folder.glob("*.ckpt")):
        score = monitored_score(load_checkpoint(path), path, monitor)
        if score is not None:
            scored.append((score, path))
    if len(scored) < k:
        raise CheckpointError(
            f"{folder} holds {len(scored)} checkpoint(s) saved for their {monitor}, fewer than ensemble_top_k={k}: "
            f"train with callbacks.model_checkpoint.save_top_k={k} (or more), or lower ensemble_top_k."
        )
    return [path for _, path in sorted(scored, key=lambda item: -item[0])[:k]]


def saved_run_config(checkpoint_path: Path) -> DictConfig:
    """The composed config of the run that wrote `checkpoint_path` (its folder's .hydra/config.yaml); CheckpointError when missing."""
    saved = run_dir_of(checkpoint_path) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(
            f"{saved} is missing: the run's config is restored from its run folder. Keep the checkpoint "
            "inside its run folder (logs/<task>/runs/<time>/checkpoints/), or copy the folder's .hydra/ with it."
        )
    config = OmegaConf.load(saved)
    overrides = saved.parent / "overrides.yaml"
    if overrides.is_file():  # a quick experiment run with another learner: the same keys left out as when it trained
        fit_experiment_to_learner(config, [str(item) for item in OmegaConf.load(overrides)])
    return config


def load_weights(algorithm: EpisodicModule, checkpoint: dict[str, Any], path: Path) -> None:
    """Put a checkpoint's weights, and what the algorithm keeps beside them (on_load_checkpoint), into the algorithm built from its run config.

    CheckpointError when the weights do not fit.
    """
    try:
        algorithm.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model of its run config "
            f"({str(error).splitlines()[0][:200]}). Were model.* or data.n_way overridden? Drop those overrides."
        ) from None
    algorithm.on_load_checkpoint(checkpoint)  # e.g. Reptile's persistent inner Adam state, which evaluation starts from


def restore_input_format(datamodule: ClassTaskDataModule, checkpoint: dict[str, Any], path: Path) -> InputFormat:
    """How the run's inputs reach its model: its image format with the mean/std its checkpoint saved (else the configured
    ones, never recomputed), or its text format (tokenizer, max_tokens; a checkpoint of another tokenizer is refused)."""
    datamodule.load_state_dict(checkpoint.get(type(datamodule).__qualname__, {}))
    if datamodule.modality == "images" and datamodule.mean is None:
        raise CheckpointError(
            f"checkpoint {path} holds no data mean/std (it predates their saving) and its run computed them "
            "(data.mean=null): give the values its training log printed, data.mean=[...] data.std=[...]."
        )
    return datamodule.input_format()
