"""Every algorithm x data set composes and instantiates; bad config values fail with a clear message."""

import pytest
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule

from metalight.config import validate_config
from metalight.errors import ConfigError

ALGOS = ["maml", "fomaml", "reptile"]
DATASETS = ["omniglot", "miniimagenet"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("data", DATASETS)
def test_every_combination_instantiates(compose_train, algo, data):
    cfg = compose_train(f"algo={algo}", f"data={data}")
    validate_config(cfg)
    datamodule = instantiate(cfg.data)
    algorithm = instantiate(cfg.algo, model=instantiate(cfg.model))
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(datamodule, LightningDataModule)
    assert isinstance(algorithm, LightningModule) and not algorithm.automatic_optimization
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.n_way=0", "data.n_way"),
        ("data.k_shot=abc", "data.k_shot"),
        ("algo.inner_lr=-1", "algo.inner_lr"),
        ("data.meta_batch_size=3", "data.meta_batch_size"),
    ],
)
def test_bad_values_name_the_key(compose_train, override, key):
    cfg = compose_train(override, "trainer.devices=2")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
