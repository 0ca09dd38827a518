"""Conv4: output shapes of both variants, BatchNorm without running statistics, Chen et al.'s initialization, config errors."""

import math

import pytest
import torch

from metalight.errors import ConfigError
from metalight.models import MLP, Conv4
from metalight.algorithms import RelationNet
from metalight.models.conv4_relation import Conv4Relation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("channels", "size", "hidden", "pool", "head_inputs"),
    [(1, 28, 64, True, 64), (3, 84, 32, True, 32 * 5 * 5), (1, 28, 64, False, 64), (3, 84, 32, False, 32)],
)
def test_conv4_shapes(channels, size, hidden, pool, head_inputs):
    model = Conv4(channels, n_way=5, hidden=hidden, image_size=size, pool=pool)
    assert model.head.in_features == head_inputs
    assert model(torch.randn(2, channels, size, size)).shape == (2, 5)
    blocks = model.features[:4]
    strides = [block[0].stride for block in blocks]
    assert strides == [(1, 1) if pool else (2, 2)] * 4
    assert all((len(block) == 4) == pool for block in blocks)  # max-pool only when pooling


def test_batch_statistics_by_default_in_train_and_eval_mode():
    model = Conv4(1, n_way=5, hidden=8, image_size=28).eval()
    assert not list(model.buffers())  # nothing that could carry over from one task to the next
    x = torch.randn(4, 1, 28, 28)
    # with batch statistics an example's logits depend on the rest of its batch, even in eval mode
    assert not torch.allclose(model(x)[:2], model(x[:2]))


def test_running_statistics_on_request():
    model = Conv4(1, n_way=5, hidden=8, image_size=28, track_running_stats=True).eval()
    assert any(name.endswith("running_mean") for name, _ in model.named_buffers())
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))


def test_flatten_readout_is_supervised_reptiles_omniglot_net():
    model = Conv4(1, 5, hidden=64, image_size=28, pool=False, readout="flatten")
    assert model.head.in_features == 2 * 2 * 64  # 28 -> 14 -> 7 -> 4 -> 2
    assert model.features(torch.randn(3, 1, 28, 28)).shape == (3, 256)
    pooled_mean = Conv4(1, 5, hidden=8, image_size=28, pool=True, readout="mean")
    assert pooled_mean.head.in_features == 8


def test_leaky_relu_activation_passes_negative_values():
    model = Conv4(1, 5, hidden=4, image_size=28, pool=False, activation="leaky_relu")
    activations = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(activations) == 4 and all(m.negative_slope == 0.01 for m in activations)
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


def test_he_fan_out_init_is_chen_et_als_init_layer():
    torch.manual_seed(0)
    chen = Conv4(3, 5, hidden=64, image_size=84, init="he_fan_out")
    torch.manual_seed(0)
    default = Conv4(3, 5, hidden=64, image_size=84)
    convs = [m for m in chen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for conv, theirs in zip(convs, [m for m in default.modules() if isinstance(m, torch.nn.Conv2d)]):
        expected = math.sqrt(2.0 / (3 * 3 * conv.out_channels))  # CloserLookFewShot's init_layer: n = k * k * out_channels
        weight = conv.weight.detach()
        assert abs(float(weight.std()) / expected - 1) < 0.05, (float(weight.std()), expected)
        assert abs(float(weight.mean())) < 0.05 * expected
        # PyTorch's default (kaiming_uniform with a=sqrt(5)) has std 1/sqrt(3 * fan_in): 0.111 and 0.024 here, not 0.059
        assert abs(float(theirs.weight.detach().std()) / expected - 1) > 0.5
        torch.testing.assert_close(conv.bias, theirs.bias, rtol=0, atol=0)  # biases keep PyTorch's init, as theirs
    norms = [m for m in chen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    torch.testing.assert_close(chen.head.weight, default.head.weight, rtol=0, atol=0)


def test_only_chen_et_als_protocols_change_the_init(compose_train):
    for experiment in ("baseline_miniimagenet_5w1s", "baseline_miniimagenet_5w5s", "baselinepp_miniimagenet_5w1s", "baselinepp_miniimagenet_5w5s"):
        assert compose_train(f"experiment={experiment}").model.init == "he_fan_out", experiment
    for experiment in ("maml_miniimagenet_5w1s", "protonet_miniimagenet_5w1s", "quick_omniglot_baseline"):
        assert compose_train(f"experiment={experiment}").model.init == "default", experiment


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_way": 0}, "n_way=0"), ({"image_size": 8}, "image_size=8"), ({"activation": "gelu"}, "activation='gelu'"), ({"readout": "max"}, "readout='max'"),
     ({"init": "xavier"}, "init='xavier'")],
)
def test_conv4_rejects_bad_config(kwargs, message):
    arguments = {"in_channels": 1, "n_way": 5, "image_size": 28} | kwargs
    with pytest.raises(ConfigError, match=message):
        Conv4(**arguments)


def test_finn_init_is_cbfinn_mamls_truncated_normal():
    """model.init=finn: weights N(0, 0.01) truncated at two standard deviations (std 0.0088 after truncation), zero biases."""
    torch.manual_seed(0)
    layers = [m for m in MLP(1, 1, hidden=(40, 40), init="finn").modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        assert float(layer.weight.abs().max()) <= 0.02 and bool((layer.bias == 0).all())
    hidden = layers[1].weight.detach()  # 1,600 draws
    assert abs(float(hidden.std()) / 0.0088 - 1) < 0.1 and abs(float(hidden.mean())) < 0.001
    torch.manual_seed(0)
    assert float(MLP(1, 1, hidden=(40, 40), init="default").features[2].weight.std()) > 0.05  # PyTorch's: 1/sqrt(3 * 40)


def test_sung_init_is_their_weights_init():
    """Relation module: conv N(0, sqrt(2 / (9 * out))) and zero bias, BatchNorm 1 / 0, linear N(0, 0.01) with bias 1."""
    torch.manual_seed(0)
    relation = RelationNet(Conv4Relation(1, 5, image_size=28)).model.relation  # algo.init=sung, the default
    convs = [m for m in relation.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2
    for conv in convs:
        expected = math.sqrt(2.0 / (9 * conv.out_channels))
        assert abs(float(conv.weight.std()) / expected - 1) < 0.05 and bool((conv.bias == 0).all())
    norms = [m for m in relation.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    assert abs(float(relation.fc1.weight.std()) / 0.01 - 1) < 0.1  # 64 x 8 draws
    assert bool((relation.fc1.bias == 1).all() and (relation.fc2.bias == 1).all())
