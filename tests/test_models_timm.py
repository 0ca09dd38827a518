"""model=timm: a timm body (random weights, timm's tiny test networks) trains a ProtoNet step through the configs; bad names,
missing pretrained weights and fused norms under MAML++ are one clear line."""

import pytest
import torch

from metalight.algorithms import MAMLpp
from metalight.errors import ConfigError
from metalight.models import TimmBackbone
from metalight.runs.training import build, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_protonet_step_through_the_configs_moves_the_timm_body(compose_train):
    overrides = ["algo=protonet", "model=timm", "model.name=test_efficientnet", "debug=fast_dev_run", "logger=csv", "data.meta_batch_size=2", "data.eval_batch_size=2"]
    cfg = compose_train(*overrides)
    before = {k: v.clone() for k, v in build(cfg)["algorithm"].model.features.state_dict().items()}  # build seeds: the same start
    metrics, objects = train(compose_train(*overrides))
    body = objects["algorithm"].model.features
    assert objects["trainer"].global_step == 1 and 0.0 <= metrics["test/acc"] <= 1.0
    assert type(body).__module__.startswith("timm.") and body.num_features == 256
    moved = [k for k, v in body.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in moved)


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ConfigError, match=r"model.name='resnet10tt' is not a timm model: did you mean resnet10t"):
        TimmBackbone("resnet10tt", in_channels=3, n_way=5)


def test_batch_statistics_only_on_request():
    x = torch.randn(4, 1, 32, 32)
    plain = TimmBackbone("test_resnet", in_channels=1, n_way=5, track_running_stats=False).eval()
    assert not [name for name, _ in plain.named_buffers() if "running" in name]
    assert not torch.allclose(plain(x)[:2], plain(x[:2]))  # normalized with the statistics of the batch, even in eval mode
    tracked = TimmBackbone("test_resnet", in_channels=1, n_way=5).eval()
    torch.testing.assert_close(tracked(x)[:2], tracked(x[:2]))


def test_mamlpp_refuses_norms_that_fuse_an_activation():
    with pytest.raises(ConfigError, match="BatchNormAct2d.*algo.bnrs=false algo.bnwb=false"):
        MAMLpp(TimmBackbone("test_efficientnet", in_channels=1, n_way=5))


def test_pretrained_weights_offline_without_a_cache_stop_the_build(compose_train, monkeypatch, tmp_path):
    """The one line cli prints (exit status 2) before the run writes anything: build() comes first."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    cfg = compose_train("model=timm", "model.name=test_resnet", "model.pretrained=true")
    with pytest.raises(ConfigError, match="model.pretrained=true: the weights of test_resnet are not in the local cache"):
        build(cfg)
