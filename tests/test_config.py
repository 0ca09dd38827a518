"""Every algorithm x data set x model composes and instantiates; unsupported combinations and bad values fail with a clear message."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import OmegaConf, open_dict

from metalight.runs.config import validate_config
from metalight.errors import ConfigError
from metalight.runs.training import build, train

CONF = Path(__file__).resolve().parents[1] / "conf"
# image data sets, the image networks and the learners that take images; the regression families, model=mlp:
# test_regression.py; algo=cnp and its model=cnp (regression only): test_algo_cnp.py; algo=maml_rl and its
# model=gaussian_mlp and gaussian_gru (RL only): test_rl.py, test_rl2.py; the text encoders (model=text_bag, text_cnn): test_text_models.py;
# GrBAL's model=dynamics_mlp (dynamics tasks only): test_grbal.py
ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml") if not any(t in p.read_text() for t in ("metalight.algorithms.CNP", "metalight.algorithms.MAMLRL", "metalight.algorithms.RL2")))
DATASETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if "metalight.data.FewShotDataModule" in p.read_text())
MODELS = sorted(
    p.stem for p in (CONF / "model").glob("*.yaml")
    if not any(t in p.read_text() for t in ("metalight.models.MLP", "metalight.models.CNPNetwork", "metalight.models.GaussianMLP", "metalight.models.GaussianGRU", "metalight.models.DynamicsMLP", "metalight.text."))
)
_NODES: dict[tuple[str, str], dict] = {}
# options built at test sizes: the one data set without a default location, and the large networks (the full
# ResNet-12 and timm's resnet18, built once per algorithm and data set, would cost seconds)
_OVERRIDES = {
    ("data", "folder"): ["data.root=/any/folder"],
    ("model", "resnet12"): ["model.channels=[4,4,4,4]"],
    ("model", "timm"): ["model.name=test_resnet"],
}


def _node(compose_train, group: str, option: str) -> dict:
    """The unresolved config of one option of a group (composed once per test session)."""
    if (group, option) not in _NODES:
        overrides = _OVERRIDES.get((group, option), [])
        _NODES[group, option] = OmegaConf.to_container(compose_train(f"{group}={option}", *overrides)[group], resolve=False)
    return _NODES[group, option]


@pytest.mark.parametrize("data", DATASETS)
def test_every_data_set_instantiates(compose_train, data):
    cfg = compose_train(f"data={data}", *(["data.root=/any/folder"] if data == "folder" else []))
    validate_config(cfg)
    assert isinstance(instantiate(cfg.data), LightningDataModule)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_builds_on_every_data_set_and_model(compose_train, algo):
    cfg = compose_train(f"algo={algo}")
    own = {key: cfg.data[key] for key in ("train_mode", "batch_size") if key in cfg.data}  # data keys algo=baseline sets itself
    for data in DATASETS:
        for model in MODELS:
            with open_dict(cfg):
                cfg.data, cfg.model = _node(compose_train, "data", data) | own, _node(compose_train, "model", model)
            validate_config(cfg)
            algorithm = instantiate(cfg.algo, model=instantiate(cfg.model))
            assert isinstance(algorithm, LightningModule) and not algorithm.automatic_optimization, (data, model)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo=maml", "data.n_way_train=20"], r"training tasks are 20-way \(data.n_way_train\) but the model's head has 5 outputs"),
        (["algo=reptile", "data.n_way_train=3"], "only algo=protonet trains with other ways"),
        (["algo=protonet", "+algo.inner_lr=0.1"], r"algo.inner_lr is not an option of metalight.algorithms.ProtoNet"),
        (["algo=mamlpp", "algo.msl_epochs=30", "trainer.max_steps=1000", "data.batches_per_epoch=100"], "algo.msl_epochs=30 reaches beyond the run, which has 10 epochs"),
        (["algo=mamlpp", "algo.da=true", "algo.da_epochs=11", "trainer.max_steps=1000", "data.batches_per_epoch=100"], "algo.da_epochs=11"),
        (["algo=metasgd", "algo.inner_lr=5"], "algo.inner_lr=5 is not a sane initial learned step size"),
        (["algo=protonet", "data.k_shot=0"], "data.k_shot=0"),
    ],
)
def test_unsupported_combinations_stop_with_one_clear_error(compose_train, overrides, message):
    cfg = compose_train(*overrides, "debug=fast_dev_run", "logger=csv")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_the_checks_run_before_anything_is_built(compose_train):
    with pytest.raises(ConfigError, match="msl_epochs"):
        build(compose_train("algo=mamlpp", "algo.msl_epochs=99", "trainer.max_steps=10"))
