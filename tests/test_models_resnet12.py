"""ResNet-12: the references' parameter count, output shapes, DropBlock, config errors, and MAML's exact meta-gradient through it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import make_batch

from metalight.algorithms import MAML
from metalight.algorithms.optimization.functional import make_task_fn, run_tasks, split_state
from metalight.errors import ConfigError
from metalight.models import ResNet12
from metalight.models.resnet12 import DropBlock

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def test_parameter_count_is_metaoptnets():
    model = ResNet12(3, n_way=5)
    # counted from the architecture: per block 3 bias-free 3x3 convs, a bias-free 1x1 shortcut, 4 BatchNorms (weight, bias)
    widths = [3, 64, 160, 320, 640]
    expected = sum(9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c for c_in, c in zip(widths, widths[1:]))
    body = sum(p.numel() for p in model.features.parameters())
    assert body == expected == 12_424_320  # MetaOptNet's and RFS's resnet12 body: 12,424,320
    assert sum(p.numel() for p in model.head.parameters()) == 640 * 5 + 5


@pytest.mark.parametrize(("size", "side"), [(84, 5), (32, 2)])
def test_output_shapes(size, side):
    model = ResNet12(3, n_way=5).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = model.features[:4](x)
        assert maps.shape == (2, 640, side, side)
        assert model.features(x).shape == (2, 640)
        assert model(x).shape == (2, 5)


def test_running_statistics_only_on_request():
    assert not list(ResNet12(1, 5, channels=[2, 2, 2, 2], image_size=16).buffers())
    tracked = ResNet12(1, 5, channels=[2, 2, 2, 2], image_size=16, track_running_stats=True)
    assert sum(name.endswith("running_mean") for name, _ in tracked.named_buffers()) == 4 * 4


def test_dropblock_drops_square_blocks_at_the_rate_in_training_only():
    torch.manual_seed(0)
    layer = DropBlock(rate=0.1, block_size=3)
    x = torch.ones(16, 32, 20, 20)
    out = layer(x)
    dropped = out == 0
    assert 0.08 < dropped.float().mean() < 0.12
    assert out.mean().item() == pytest.approx(1.0, abs=1e-5)  # the kept units are rescaled
    # every dropped unit lies in a 3x3 square of dropped units inside the map (a morphological opening)
    corners = -F.max_pool2d(-dropped.float(), 3, stride=1)  # 1 where a whole 3x3 square from there is dropped
    assert torch.equal(F.max_pool2d(F.pad(corners, [2] * 4), 3, stride=1).bool(), dropped)
    assert torch.equal(layer.eval()(x), x)


def test_drop_rate_places_dropout_then_dropblock():
    model = ResNet12(1, 5, channels=[2, 2, 2, 2], image_size=16, drop_rate=0.1)
    drops = [type(block.out[-1]).__name__ for block in model.features[:4]]
    assert drops == ["Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert all(isinstance(block.out[-1], torch.nn.Identity) for block in ResNet12(1, 5, channels=[2, 2, 2, 2], image_size=16).features[:4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"channels": [64, 160, 320]}, "model.channels"), ({"image_size": 8}, "image_size=8"), ({"drop_rate": 1.0}, "model.drop_rate")],
)
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ResNet12(**({"in_channels": 3, "n_way": 5} | kwargs))


def _meta_loss(maml: MAML, batch: dict) -> float:
    """The mean query loss after adapting each task from the current weights (values only, the loop path)."""
    params, fixed = split_state(maml.model)
    loop = dataclasses.replace(maml.train_loop, first_order=True)
    fn = make_task_fn(maml.model, fixed, loop, "loop", record="last")
    with torch.no_grad():
        return run_tasks(fn, params, batch, None, "loop", second_order=False).loss.mean().item()


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_maml_meta_gradient_through_a_tiny_resnet12_matches_finite_differences(path):
    torch.manual_seed(0)
    model = ResNet12(1, n_way=3, channels=[3, 4, 4, 5], image_size=16).to(F64)
    maml = MAML(model, inner_lr=0.3, inner_steps=2, first_order=False, task_parallel=path)
    maml.manual_backward = lambda loss: loss.backward()  # what Lightning's does on one CPU process in 64-bit
    batch = make_batch(2, size=16, dtype=F64)
    maml.compute_meta_gradient(batch, measure=False)
    params = dict(maml.model.named_parameters())
    assert all(p.grad is not None for p in params.values())

    generator = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(p.shape, generator=generator, dtype=F64) for k, p in params.items()}
    analytic = sum((p.grad * direction[k]).sum() for k, p in params.items()).item()
    # tiny: the inner gradient jumps where one of the network's ~10^4 LeakyReLU or max-pool units crosses a kink, and
    # a step of 1e-6 crosses some (finite differences then swing by 10^4); at 1e-8 none is crossed, and rounding
    # error stays near 1e-16 / h = 1e-8
    h = 1e-8

    def meta_loss_at(sign: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.add_(sign * h * direction[k])
        value = _meta_loss(maml, batch)
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(sign * h * direction[k])
        return value

    numeric = (meta_loss_at(1.0) - meta_loss_at(-1.0)) / (2 * h)
    assert abs(analytic) > 1e-3
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)
