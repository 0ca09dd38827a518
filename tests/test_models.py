"""Conv4: output shapes of both variants, BatchNorm without running statistics, config errors."""

import pytest
import torch

from metalight.errors import ConfigError
from metalight.models import Conv4

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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_way": 0}, "n_way=0"), ({"image_size": 8}, "image_size=8"), ({"activation": "gelu"}, "activation='gelu'"), ({"readout": "max"}, "readout='max'")],
)
def test_conv4_rejects_bad_config(kwargs, message):
    arguments = {"in_channels": 1, "n_way": 5, "image_size": 28} | kwargs
    with pytest.raises(ConfigError, match=message):
        Conv4(**arguments)
