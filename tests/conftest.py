"""Shared fixtures: where the real data lives, and a switch for slow tests."""

import contextlib
import logging
import os
from pathlib import Path

import pytest

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: a worker per core), one torch thread per worker and per process a test starts
    (train.py runs, DDP ranks, notebook kernels): the workers already fill the cores, and more threads than cores
    slow every process down."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with slow tests (end-to-end runs) first, each module's tests in their order: `make test` hands whole
    modules to its workers in this order, and long ones left for last would keep one worker busy while the other idles."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow") and item.module is not None}
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in slow_modules)


def _data_root() -> Path | None:
    """DATA_DIR if set, else the repository's CI mirror ../shared/data when present."""
    env = os.environ.get("DATA_DIR")
    if env:
        return Path(env)
    return _SHARED if _SHARED.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root holding omniglot/ and miniimagenet/ as described in ../shared/data/README.md."""
    root = _data_root()
    if root is None or not (root / "omniglot").is_dir():
        pytest.skip("real data not found: set DATA_DIR to a folder holding omniglot/ (see README)")
    return root


@pytest.fixture(scope="session")
def intents_dir() -> Path:
    """Root holding intents/ (BANKING77, HWU64, Liu, OOS with their class splits) as described in ../shared/data/README.md."""
    root = _data_root()
    if root is None or not (root / "intents").is_dir():
        pytest.skip("intent data not found: set DATA_DIR to a folder holding intents/ (see README, Data: Language)")
    return root


CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One episode cache for the whole test session, so each data set is decoded once."""
    return tmp_path_factory.mktemp("metalight_cache")


def _composer(data_dir: Path | None, cache_dir: Path):
    """compose(folder, *overrides): conf/train.yaml (or config_name) shrunk for a test on `accelerator` (the CPU
    unless told), with data_dir (when given) and the session's cache, outputs under folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(folder: Path, *overrides: str, config_name: str = "train", accelerator: str = "cpu"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            if data_dir is not None:
                cfg.paths.data_dir = str(data_dir)
            cfg.paths.cache_dir = str(cache_dir)
            cfg.paths.log_dir = str(folder / "logs")
            cfg.paths.output_dir = str(folder / "run")
            cfg.hydra.runtime.output_dir = str(folder / "run")
            if "trainer" in cfg:
                cfg.trainer.accelerator = accelerator
                cfg.trainer.enable_progress_bar = False
            if "data" in cfg:
                cfg.data.num_workers = 0
                cfg.data.persistent_workers = False
                cfg.data.pin_memory = False
        HydraConfig().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture(scope="session")
def compose_in(data_dir: Path, cache_dir: Path):
    """compose(folder, *overrides) with the real data (conftest._composer); for fixtures of any scope."""
    from hydra.core.global_hydra import GlobalHydra

    yield _composer(data_dir, cache_dir)
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_generated(cache_dir: Path, tmp_path: Path):
    """compose(*overrides) for configs whose tasks are generated (data=sinusoid, ...): no data folder needed, outputs under tmp_path."""
    from hydra.core.global_hydra import GlobalHydra

    compose = _composer(None, cache_dir)
    # folder: a subfolder of tmp_path for one of several runs of a test
    yield lambda *overrides, folder="", **options: compose(tmp_path / folder, *overrides, **options)
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_train(compose_in, tmp_path: Path):
    """Compose conf/train.yaml with overrides, shrunk for a CPU test (accelerator=... to choose), outputs under tmp_path."""
    from hydra.core.global_hydra import GlobalHydra

    yield lambda *overrides, **options: compose_in(tmp_path, *overrides, **options)
    GlobalHydra.instance().clear()


@contextlib.contextmanager
def _logging_restored():
    """Undo the logging set-up of a Hydra run in this process (handlers on captured streams and run folders, levels)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            for handler in set(lg.handlers) - set(handlers):
                handler.close()
            lg.handlers[:] = handlers
            lg.level, lg.propagate, lg.disabled = level, propagate, disabled


@pytest.fixture
def train_py_in_process(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, cache_dir: Path):
    """run(data_dir, log_dir, *args) -> (exit status, stdout + stderr): `python train.py args` in this process.

    The same entry point as the command line (Hydra's parsing and composition, then train.py's wrapper of
    errors) without starting a process that imports torch and Lightning again: for the many one-line-error
    cases. An exception that escapes the wrapper fails the test with its traceback, as a real run would show it.
    """
    import importlib.util

    from hydra.core.global_hydra import GlobalHydra

    spec = importlib.util.spec_from_file_location("train_entry_point", Path(__file__).resolve().parents[1] / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    # Hydra finds config_path="conf" beside the file of a task function defined in __main__, as when run as a script
    entry.main.__wrapped__.__module__ = "__main__"

    def run(data_dir: Path, log_dir: Path, *args: str) -> tuple[int, str]:
        with _logging_restored():
            return _run(data_dir, log_dir, *args)

    def _run(data_dir: Path, log_dir: Path, *args: str) -> tuple[int, str]:
        GlobalHydra.instance().clear()
        monkeypatch.setenv("DATA_DIR", str(data_dir))
        monkeypatch.setenv("METALIGHT_CACHE", str(cache_dir))
        flags = [arg for arg in args if arg.startswith("-")]  # --multirun: before the overrides, as argparse wants
        overrides = [arg for arg in args if not arg.startswith("-")]
        monkeypatch.setattr("sys.argv", ["train.py", *flags, f"paths.log_dir={log_dir}", "trainer.accelerator=cpu", *overrides])
        capfd.readouterr()
        try:
            entry.main()
            status = 0
        except SystemExit as stopped:
            status = stopped.code if isinstance(stopped.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
        captured = capfd.readouterr()
        return status, captured.out + captured.err

    return run


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the cores are shared, and extra threads only slow small ops down."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
