"""Shared fixtures: where the real data lives, and a switch for slow tests."""

import os
from pathlib import Path

import pytest

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: a worker per core), one torch thread per worker: the workers already fill the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the cores are shared, and extra threads only slow small ops down."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
