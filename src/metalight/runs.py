"""A trained run on disk: the config its folder keeps, its weights, and the image format its checkpoint saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metalight.algorithms.base import EpisodicModule
from metalight.checkpoints import run_dir_of
from metalight.data.datamodule import FewShotDataModule
from metalight.data.preprocess import ImageFormat
from metalight.errors import CheckpointError


def saved_run_config(checkpoint_path: Path) -> DictConfig:
    """The composed config of the run that wrote `checkpoint_path` (its folder's .hydra/config.yaml); CheckpointError when missing."""
    saved = run_dir_of(checkpoint_path) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(
            f"{saved} is missing: the run's config is restored from its run folder. Keep the checkpoint "
            "inside its run folder (logs/<task>/runs/<time>/checkpoints/), or copy the folder's .hydra/ with it."
        )
    return OmegaConf.load(saved)


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


def restore_image_format(datamodule: FewShotDataModule, checkpoint: dict[str, Any], path: Path) -> ImageFormat:
    """The run's image format, with the mean/std its checkpoint saved (else the configured ones), never recomputed."""
    datamodule.load_state_dict(checkpoint.get(type(datamodule).__qualname__, {}))
    if datamodule.mean is None:
        raise CheckpointError(
            f"checkpoint {path} holds no data mean/std (it predates their saving) and its run computed them "
            "(data.mean=null): give the values its training log printed, data.mean=[...] data.std=[...]."
        )
    return datamodule.image_format()
