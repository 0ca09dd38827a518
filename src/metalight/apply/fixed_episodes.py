"""`eval.py episodes=<file>|lake_runs`: score exactly the episodes a file lists, or Lake et al.'s 20 one-shot runs.

The episodes go through Lightning's test loop as batches of one task each, so they are scored by the same
`EpisodicModule` code as the random test tasks (evaluate_tasks, accuracy ± 95% CI over tasks, per-step
accuracies); episode i is task number i (what Reptile's evaluation minibatches are seeded by).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from metalight.algorithms.base import EpisodicModule
from metalight.data.episode_files import Episode, read_episodes
from metalight.data.lake_runs import load_lake_runs
from metalight.data.preprocess import InputFormat
from metalight.runs.checkpoints import restore_input_format

log = logging.getLogger(__name__)

LAKE_RUNS = "lake_runs"
# Lake, Salakhutdinov & Tenenbaum 2015 (Science), Fig. 3: error rates on the 20 runs (%)
LAKE_PUBLISHED = {"people": 4.5, "Bayesian Program Learning": 3.3, "Siamese convnet (Koch et al.)": 8.0, "deep convnet (Lake et al.)": 13.5}


def read_named_episodes(cfg: DictConfig, modality: str = "images") -> list[Episode]:
    """The episodes `cfg.episodes` names: Lake's runs under the data folder (fetched if allowed) or those of a file (of images or utterances)."""
    if cfg.episodes == LAKE_RUNS:
        omniglot = Path(cfg.paths.data_dir) / "omniglot"
        return load_lake_runs(omniglot, cfg.lake_runs.download, cfg.lake_runs.url, cfg.lake_runs.md5)
    return read_episodes(cfg.episodes, modality)


def episode_batches(episodes: list[Episode], input_format: InputFormat) -> list[dict[str, Tensor]]:
    """Every episode as a batch of one task (images normalized, utterances tokenized), all read before any is scored (a bad image stops the run first)."""
    return [episode.batch(input_format) for episode in episodes]


def score_episodes(algorithm: EpisodicModule, trainer: pl.Trainer, batches: list[dict[str, Tensor]]) -> tuple[dict[str, Any], list[Tensor]]:
    """Test results over the episodes (as for random test tasks) and each episode's final query logits [N*Q, N]."""
    algorithm.keep_test_logits = True
    trainer.test(algorithm, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    logits = [batch_logits[0] for batch_logits, _ in algorithm.test_outputs]
    return dict(algorithm.test_results), logits


def evaluate_episodes(cfg: DictConfig, objects: dict[str, Any], checkpoint: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """Score the checkpoint (weights loaded) on cfg.episodes; the results and the kind of their file (lake_runs, or the episodes file's stem)."""
    datamodule = objects["datamodule"]
    episodes = read_named_episodes(cfg, datamodule.modality)
    batches = episode_batches(episodes, restore_input_format(datamodule, checkpoint, path))
    results, logits = score_episodes(objects["algorithm"], objects["trainer"], batches)
    accs = [float((lg.argmax(-1) == b["query_y"][0].to(lg.device)).double().mean()) for lg, b in zip(logits, batches)]
    results |= {"checkpoint": str(path), "global_step": checkpoint.get("global_step"), "episodes": str(cfg.episodes)}
    results["episode_accs"] = {episode.name: acc for episode, acc in zip(episodes, accs)}
    kind = LAKE_RUNS if cfg.episodes == LAKE_RUNS else Path(cfg.episodes).stem
    if cfg.episodes == LAKE_RUNS:
        results |= _lake_report(episodes, accs, sum(len(b["query_y"][0]) for b in batches))
    return results, kind


def _lake_report(episodes: list[Episode], accs: list[float], n_queries: int) -> dict[str, Any]:
    """Error rate over Lake's runs (%, over all test drawings), per run, logged beside the published figures."""
    errors = {episode.name: round(100 * (1 - acc), 2) for episode, acc in zip(episodes, accs)}
    wrong = sum((1 - acc) * len(episode.query) for episode, acc in zip(episodes, accs))
    rate = 100 * wrong / n_queries
    log.info("Lake's one-shot runs: error rate %.2f%% over %d test drawings (published: %s)", rate, n_queries,
             ", ".join(f"{who} {value}%" for who, value in LAKE_PUBLISHED.items()))
    log.info("errors per run: %s", " ".join(f"{name} {value:g}%" for name, value in errors.items()))
    return {"error_rate": rate, "run_errors": errors}
