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


@pytest.mark.parametrize(("kwargs", "message"), [({"n_way": 0}, "n_way=0"), ({"image_size": 8}, "image_size=8")])
def test_conv4_rejects_bad_config(kwargs, message):
    arguments = {"in_channels": 1, "n_way": 5, "image_size": 28} | kwargs
    with pytest.raises(ConfigError, match=message):
        Conv4(**arguments)
