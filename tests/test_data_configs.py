"""Every data set config composes and instantiates with every algorithm config (and the model its algorithm uses)."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from metalight.runs.config import validate_config
from metalight.data import FewShotDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"
# image data sets (FewShotDataModule); the regression families (RegressionDataModule) are tested in test_regression.py
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if "metalight.data.FewShotDataModule" in p.read_text())
# learners that take images (algo=cnp learns regression tasks only: test_algo_cnp.py; algo=maml_rl RL tasks only: test_rl.py)
ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml") if not any(t in p.read_text() for t in ("metalight.algorithms.CNP", "metalight.algorithms.MAMLRL", "metalight.algorithms.RL2")))


def test_every_data_set_has_a_config() -> None:
    from metalight.data.datamodule import DATASETS

    assert set(DATA) == set(DATASETS)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("data", DATA)
def test_data_composes_with_algo(compose_train, tmp_path: Path, data: str, algo: str) -> None:
    overrides = [f"data={data}", f"algo={algo}"] + ([f"data.root={tmp_path}"] if data == "folder" else [])
    cfg = compose_train(*overrides)
    validate_config(cfg)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, FewShotDataModule) and datamodule.dataset == cfg.data.dataset
    assert datamodule.channels == cfg.model.in_channels and datamodule.image_size == cfg.model.image_size
    instantiate(cfg.algo, model=instantiate(cfg.model))
