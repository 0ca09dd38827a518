"""MetaOptNet's piecewise LR schedule, as protonet_resnet12_* configure it: the LR at each boundary."""

import pytest
import torch
from hydra.utils import instantiate

from metalight.errors import ConfigError
from metalight.algorithms.schedules import PiecewiseFactor


def test_protonet_resnet12_lr_follows_metaoptnet(compose_train):
    cfg = compose_train("experiment=protonet_resnet12_miniimagenet_5w1s")
    optimizer = instantiate(cfg.algo.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.algo.scheduler)(optimizer)
    seen = {}
    for step in range(60000):
        if step in (0, 19999, 20000, 39999, 40000, 50000, 59999):
            seen[step] = optimizer.param_groups[0]["lr"]
        scheduler.step()
    expected = {0: 0.1, 19999: 0.1, 20000: 0.006, 39999: 0.006, 40000: 0.0012, 50000: 0.00024, 59999: 0.00024}
    assert seen == pytest.approx(expected)


def test_boundaries_and_factors_must_match():
    with pytest.raises(ConfigError, match="one factor more than boundaries"):
        PiecewiseFactor([10, 20], [1.0, 0.1])
