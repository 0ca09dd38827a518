"""End to end through the Hydra configs: fast_dev_run per algorithm, DDP errors on 2 CPU processes, and CLI errors.

(A DDP run of train.py on 2 CPU processes and its run folder: tests/test_preemption.py, the reference run.)
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from metalight.errors import DataError
from metalight.runs.training import checkpoint_to_test, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
def test_fast_dev_run(compose_train, algo):
    # two evaluation inner steps: Reptile's default 50 would make this its slowest case, and the count does not change the path
    cfg = compose_train(f"algo={algo}", "debug=fast_dev_run", "logger=csv", "data.meta_batch_size=4", "data.eval_batch_size=4", "algo.eval_inner_steps=2")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_a_run_trained_on_its_validation_classes_tests_its_last_weights():
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path="best.ckpt"))
    assert checkpoint_to_test(trainer, SimpleNamespace(train_on_val=False)) == "best.ckpt"
    assert checkpoint_to_test(trainer, SimpleNamespace(train_on_val=True)) is None
    assert checkpoint_to_test(SimpleNamespace(checkpoint_callback=None), SimpleNamespace(train_on_val=False)) is None


def _run_train(args: list[str], tmp_path: Path, data_dir: Path, cache_dir: Path, timeout: int = 300):
    """`python train.py` on the CPU (GPUs hidden too) whatever the machine has; logs under tmp_path."""
    env = dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "trainer.accelerator=cpu", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo=mamll", "Could not find 'algo/mamll'"),
        ("algo.no_such_key=1", "no_such_key"),
        ("data.n_way=abc", "data.n_way"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("data.split=foo", "data.split='foo' is not a split of omniglot"),
        ("data.k_shot=10", "data.k_shot=10 + data.k_query=15"),
        ("algo=reptile algo.inner_state=kept", "algo.inner_state='kept' is not known"),
        ("algo=reptile algo.inner_optimizer=sgd", "algo.inner_state=persistent keeps the inner optimizer's moments"),
    ],
)
def test_cli_errors_are_one_clear_message(tmp_path, data_dir, train_py_in_process, override, expected):
    # train.py's own entry point in this process (Hydra's errors, then ours); the real process boundary is
    # tested by test_a_bad_task_shape_stops_before_the_run_writes_anything and the DDP case below
    status, output = train_py_in_process(data_dir, tmp_path / "logs", *override.split(), "debug=fast_dev_run")
    assert status != 0
    assert expected in output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*")), "a run stopped by a bad input left its folder behind"


@pytest.mark.slow
def test_a_bad_task_shape_stops_before_the_run_writes_anything(tmp_path, data_dir, cache_dir):
    # no debug mode: the TensorBoard logger is on, and the data is checked before it writes its first event file
    result = _run_train(["algo=protonet", "data.k_shot=10"], tmp_path, data_dir, cache_dir, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "data.k_shot=10 + data.k_query=15" in output and "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*")), "the stopped run left its folder behind"


def test_missing_data_folder_is_reported(tmp_path, train_py_in_process):
    status, output = train_py_in_process(tmp_path / "nowhere", tmp_path / "logs", "debug=fast_dev_run", "data.download=false")
    assert status == 2, output[-2000:]
    assert str(tmp_path / "nowhere") in output and "DATA_DIR" in output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*")), "the stopped run left its folder behind"


@pytest.mark.slow
def test_missing_data_folder_is_reported_once_by_two_ddp_processes(tmp_path, cache_dir):
    # the data is checked before the second process starts: one message, no broken connections
    result = _run_train(["trainer=ddp_cpu", "data.download=false"], tmp_path, tmp_path / "nowhere", cache_dir, 120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert str(tmp_path / "nowhere") in output and "DATA_DIR" in output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*")), "the stopped run left its folder behind"


def test_every_ddp_process_ends_with_the_one_message(tmp_path, monkeypatch, caplog):
    """A process whose collective breaks because another one stopped on our error ends with that error's line, status 2."""
    from metalight.runs import cli

    monkeypatch.setattr(cli, "_error_file", lambda: tmp_path / cli.ERROR_FILE)  # as in a 2-process run
    monkeypatch.setattr(cli, "ERROR_WAIT_S", 0.0)

    def missing_data():
        raise DataError("no omniglot/ under /nowhere")

    def broken_connection():
        raise RuntimeError("Connection closed by peer")

    for function in (missing_data, broken_connection):  # the process that failed, then one of the others
        with pytest.raises(SystemExit) as stopped:
            cli.run_reporting_errors(function)
        assert stopped.value.code == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["DataError: no omniglot/ under /nowhere"] * 2
    (tmp_path / cli.ERROR_FILE).unlink()  # no other process left a message: a crash of its own keeps its traceback
    with pytest.raises(RuntimeError, match="closed by peer"):
        cli.run_reporting_errors(broken_connection)
