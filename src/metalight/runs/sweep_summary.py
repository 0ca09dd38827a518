"""A run's final results (results.json, TensorBoard hparams) and the sweep summary built from them (summary.csv/.md).

Each job of `python train.py -m ...` writes results.json into its own folder at the end of train(); the
SweepSummary Hydra callback records each job's status (completed or failed, with the error) beside it and
rewrites <sweep dir>/summary.csv and summary.md after every job and at the end of the sweep, so the
summary exists even when a failed job makes Hydra's sweeper stop with an error after the others ran.
A job folder with neither file (killed, or still running elsewhere) is listed with status "no result".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from metalight.runs.checkpoint_io import write_text_atomically

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
STATUS_FILE = "job_status.json"


def columns(metric: str = "acc") -> tuple[str, ...]:
    """The summary's columns for runs scored by `metric` (acc for classification, mse for regression)."""
    return ("job", "status", "overrides", f"best_val_{metric}", f"test_{metric}", f"test_{metric}_ci95", "global_step", "wall_time_s", "error")


def run_results(trainer: pl.Trainer, metrics: dict[str, float], metric: str = "acc") -> dict[str, Any]:
    """The numbers a sweep compares a run by: best and last validation `metric`, test `metric` with its 95% CI."""
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    return {
        "metric": metric,
        f"best_val_{metric}": float(best_score) if best_score is not None else metrics.get(f"val/{metric}"),
        f"val_{metric}": metrics.get(f"val/{metric}"),
        f"test_{metric}": metrics.get(f"test/{metric}"),
        f"test_{metric}_ci95": metrics.get(f"test/{metric}_ci95"),
        "global_step": trainer.global_step,
        "best_checkpoint": getattr(checkpoint, "best_model_path", "") or None,
    }


def record_results(trainer: pl.Trainer, output_dir: str | Path, results: dict[str, Any]) -> None:
    """Save `results` as <output_dir>/results.json and as the metrics of TensorBoard's hparams view (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    write_text_atomically(Path(output_dir) / RESULTS_FILE, json.dumps(results, indent=2))
    numbers = {f"hp/{key}": value for key, value in results.items() if isinstance(value, (int, float))}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and numbers:
            # the hyperparameters logged when the run started, now paired with its final numbers
            logger.log_hyperparams(logger.hparams, metrics=numbers)
            logger.save()


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or unreadable (a job killed while writing)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _job_row(job_dir: Path) -> dict[str, Any]:
    """One summary line for the job whose output folder is `job_dir`."""
    overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    results, status = _read_json(job_dir / RESULTS_FILE), _read_json(job_dir / STATUS_FILE)
    metric = results.get("metric", "acc")
    return {
        "job": job_dir.name,
        "status": status.get("status") or ("completed" if results else "no result"),
        "overrides": [str(item) for item in overrides],
        f"best_val_{metric}": results.get(f"best_val_{metric}"),
        f"test_{metric}": results.get(f"test_{metric}"),
        f"test_{metric}_ci95": results.get(f"test_{metric}_ci95"),
        "global_step": results.get("global_step"),
        "wall_time_s": results.get("wall_time_s"),
        "error": status.get("error"),
    }


def summarize(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job folder of `sweep_dir` in job order, and the overrides every job shares (left out of the rows)."""
    job_dirs = [path.parent.parent for path in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    job_dirs.sort(key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name))
    rows = [_job_row(job_dir) for job_dir in job_dirs]
    common = [item for item in rows[0]["overrides"] if all(item in row["overrides"] for row in rows)] if len(rows) > 1 else []
    for row in rows:
        row["overrides"] = " ".join(item for item in row["overrides"] if item not in common)
    return rows, common


def _cell(value: Any) -> str:
    """A number with 4 decimals, anything else as text, missing as empty."""
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    """A wall time as "4 min 05 s" (empty when unknown)."""
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _metric_of(row: dict[str, Any]) -> str:
    """The metric a summary row is scored by (the m of its best_val_m column)."""
    return next(key[len("best_val_") :] for key in row if key.startswith("best_val_"))


def _markdown(rows: list[dict[str, Any]], common: list[str]) -> str:
    """The summary as a Markdown table (test metric as mean ± 95% CI) under the overrides all jobs share."""
    lines = [f"Overrides of every job: `{' '.join(common)}`", ""] if common else []
    metrics = sorted({_metric_of(row) for row in rows})
    name = metrics[0] if len(metrics) == 1 else "(metric)"
    lines += [f"| job | status | overrides | best val {name} | test {name} ± 95% CI | step | wall time | error |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        metric = _metric_of(row)
        test = _cell(row[f"test_{metric}"])
        if test and row[f"test_{metric}_ci95"] is not None:
            test += f" ± {row[f'test_{metric}_ci95']:.4f}"
        best = _cell(row[f"best_val_{metric}"]) + (f" ({metric})" if len(metrics) > 1 and row[f"best_val_{metric}"] is not None else "")
        cells = [row["job"], row["status"], f"`{row['overrides']}`" if row["overrides"] else "", best,
                 test, _cell(row["global_step"]), _duration(row["wall_time_s"]), _cell(row["error"])]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """(Re)write <sweep_dir>/summary.csv and summary.md from the job folders; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows, common = summarize(sweep_dir)
    table = io.StringIO()
    fields = list(dict.fromkeys(key for metric in sorted({_metric_of(row) for row in rows}) or ["acc"] for key in columns(metric)))
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    write_text_atomically(sweep_dir / "summary.csv", table.getvalue())
    write_text_atomically(sweep_dir / "summary.md", _markdown(rows, common))
    return rows


def _is_rank_zero() -> bool:
    """False in the extra tasks a cluster starts per job (SLURM tasks_per_node > 1): only task 0 reports."""
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0


class SweepSummary(Callback):
    """Hydra callback: keep <sweep dir>/summary.csv and summary.md up to date, one line per job of a multirun."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Record this job's status in its folder and refresh the summary (multirun jobs only)."""
        if config.hydra.mode != RunMode.MULTIRUN or not _is_rank_zero():
            return
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None  # the public return_value re-raises it
        status = {"status": "failed" if failed else "completed", "error": f"{type(error).__name__}: {error}" if failed else None}
        write_text_atomically(Path(config.hydra.runtime.output_dir) / STATUS_FILE, json.dumps(status, indent=2))
        write_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the final summary and say where it is."""
        rows = write_summary(config.hydra.sweep.dir)
        failed = sum(row["status"] != "completed" for row in rows)
        log.info("Sweep summary of %d jobs (%d not completed): %s/summary.md", len(rows), failed, config.hydra.sweep.dir)
