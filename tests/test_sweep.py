"""Sweeps: every job gets a summary line (failed ones too, without stopping the others), Optuna and submitit run for real."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metalight.runs.sweep_summary import RESULTS_FILE, STATUS_FILE, write_summary

ROOT = Path(__file__).resolve().parents[1]
# a few tiny meta-steps per job: a small network, small tasks, 2 validation and 2 test tasks
TINY = [
    "trainer.max_steps=2", "data.batches_per_epoch=2", "data.meta_batch_size=2", "data.k_query=2", "data.n_val_tasks=2",
    "data.n_test_tasks=2", "data.eval_batch_size=2", "model.hidden=8", "algo.eval_inner_steps=1", "data.num_workers=0",
    "data.persistent_workers=false", "++trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]


def _job(sweep: Path, num: int, overrides: list[str], results: dict | None = None, status: dict | None = None) -> None:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (folder / RESULTS_FILE).write_text(json.dumps(results))
    if status is not None:
        (folder / STATUS_FILE).write_text(json.dumps(status))


def test_summary_lists_every_job_in_order(tmp_path):
    done = {"best_val_acc": 0.5, "test_acc": 0.4567, "test_acc_ci95": 0.0123, "global_step": 2, "wall_time_s": 245.4}
    _job(tmp_path, 10, ["seed=1", "algo=reptile"], done, {"status": "completed", "error": None})
    _job(tmp_path, 2, ["seed=1", "algo=maml", "data.n_way=9999"], None, {"status": "failed", "error": "DataError: data.n_way=9999 | too big"})
    _job(tmp_path, 1, ["seed=1", "algo=maml"], done, {"status": "completed", "error": None})
    _job(tmp_path, 3, ["seed=1", "algo=fomaml"])  # killed before it could report anything
    rows = write_summary(tmp_path)
    assert [row["job"] for row in rows] == ["1", "2", "3", "10"]
    assert [row["status"] for row in rows] == ["completed", "failed", "no result", "completed"]
    with open(tmp_path / "summary.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert table[1]["overrides"] == "algo=maml data.n_way=9999" and "n_way=9999" in table[1]["error"]
    assert float(table[0]["test_acc"]) == 0.4567
    markdown = (tmp_path / "summary.md").read_text()
    assert "0.4567 ± 0.0123" in markdown and "too big" in markdown and "\\|" in markdown
    assert float(table[0]["wall_time_s"]) == 245.4 and "| 4 min 05 s |" in markdown and table[1]["wall_time_s"] == ""
    assert "Overrides of every job: `seed=1`" in markdown and all("seed" not in row["overrides"] for row in table)


def _sweep(tmp_path: Path, data_dir: Path, cache_dir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py --multirun ...` into tmp_path/sweep (hparams_search=... sets the multirun mode itself)."""
    env = dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--multirun", f"paths.log_dir={tmp_path / 'logs'}", "hydra.sweep.dir=sweep", *TINY, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _sweep_in_process(train_py_in_process, tmp_path: Path, data_dir: Path, *args: str) -> tuple[int, str]:
    """The same sweep through train.py's entry point in this process (Hydra's basic launcher runs its jobs here too)."""
    return train_py_in_process(data_dir, tmp_path / "logs", "--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY, *args)


def _summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_multirun_summary_records_a_failed_job_and_runs_the_others(tmp_path, data_dir, train_py_in_process):
    status, output = _sweep_in_process(train_py_in_process, tmp_path, data_dir, "algo=maml,reptile", "data.n_way=5,9999")
    # Hydra's basic sweeper runs every job of the batch, then reports the failure with a non-zero status
    assert status != 0, output[-3000:]
    rows = _summary(tmp_path / "sweep")
    assert len(rows) == 4, output[-3000:]
    by_overrides = {row["overrides"]: row for row in rows}
    for algo in ("maml", "reptile"):
        good, bad = by_overrides[f"algo={algo} data.n_way=5"], by_overrides[f"algo={algo} data.n_way=9999"]
        assert good["status"] == "completed" and 0 <= float(good["test_acc"]) <= 1 and float(good["test_acc_ci95"]) >= 0
        assert 0 <= float(good["best_val_acc"]) <= 1 and float(good["wall_time_s"]) > 0
        assert bad["status"] == "failed" and "data.n_way=9999" in bad["error"]
    assert "± " in (tmp_path / "sweep" / "summary.md").read_text()
    # final numbers in TensorBoard's hparams view
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = tmp_path / "sweep" / next(row["job"] for row in rows if row["status"] == "completed")
    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    assert "hp/test_acc" in events.Tags()["scalars"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


@pytest.mark.slow
def test_optuna_search_runs_a_few_trials(tmp_path, data_dir, train_py_in_process):
    status, output = _sweep_in_process(
        train_py_in_process, tmp_path, data_dir, "hparams_search=maml_optuna", "hydra.sweeper.n_trials=3", "logger=csv", "algo.inner_steps=1"
    )
    assert status == 0, output[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"algo.inner_lr", "algo.optimizer.lr"} and 0 <= best["best_value"] <= 1
    rows = _summary(tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert all("algo.inner_lr=" in row["overrides"] for row in rows)


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path, data_dir, cache_dir):
    # gpus_per_node=0: submitit would otherwise set CUDA_VISIBLE_DEVICES=0 for each job on a GPU machine
    result = _sweep(
        tmp_path, data_dir, cache_dir, "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=0", "algo=maml,fomaml", "logger=csv", "seed=1"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rows = _summary(tmp_path / "sweep")
    assert [(row["overrides"], row["status"]) for row in rows] == [("algo=maml", "completed"), ("algo=fomaml", "completed")]
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl")), "jobs did not go through submitit"
    for row in rows:
        assert json.loads((tmp_path / "sweep" / row["job"] / RESULTS_FILE).read_text())["global_step"] == 2
