"""benchmarks/meta_step.py on a tiny case: each algorithm's step moves its meta-parameters, and metalight's step
and the learn2learn-style reference compute the same meta-gradient (which is what makes the reference's
ratios trustworthy). Not a timing test."""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("meta_step", ROOT / "benchmarks" / "meta_step.py")
meta_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(meta_step)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "omniglot_tiny"  # the "omniglot" prefix picks MAML's Omniglot inner LR (meta_step.INNER_LR)
# conv biases right below a BatchNorm normalizing with batch statistics: their meta-gradient is 0 up to rounding
BIAS_BELOW_NORM = re.compile(r"features[.-]\d[.-]0[.-]bias$")


@pytest.fixture
def tiny_case(monkeypatch):
    """The pooled conv4 with 4 filters on 16x16 images: 2 tasks of 3-way 1-shot, 2 queries, 2 inner steps; float64."""
    # (channels, image size, n_way, k_shot, k_query, meta_batch, inner steps, conv4 filters), as meta_step.CASES
    monkeypatch.setitem(meta_step.CASES, TINY, (1, 16, 3, 1, 2, 2, 2, 4))
    model, batch = meta_step.make_case(TINY, torch.device("cpu"))
    return model.double(), {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def weight_name(name: str) -> str:
    """A metalight parameter name as the reference names it: model.features.0.0.weight -> features.0.0.weight,
    step_sizes.sizes.features-0-0-weight -> step_sizes.features.0.0.weight."""
    if name.startswith("step_sizes.sizes."):
        return "step_sizes." + name.removeprefix("step_sizes.sizes.").replace("-", ".")
    return name.removeprefix("model.")


@pytest.mark.parametrize("path", ["vmap", "loop", "reference"])
@pytest.mark.parametrize("algo", ["anil", "metasgd", "mamlpp", "protonet"])
def test_every_step_moves_the_meta_parameters(tiny_case, algo, path):
    model, batch = tiny_case
    step = meta_step.build_step(algo, TINY, path, model)
    before = {k: p.detach().clone() for k, p in step.parameters.items()}
    step(batch)
    if algo == "metasgd" or (algo == "mamlpp" and path != "reference"):
        assert any(k.startswith("step_sizes.") for k in step.parameters), "the learned step sizes are outer parameters"
    for k, p in step.parameters.items():
        assert torch.isfinite(p).all(), k
        assert BIAS_BELOW_NORM.search(k) or not torch.equal(p.detach(), before[k]), f"{k} did not move"


@pytest.mark.parametrize("path", ["vmap", "loop"])
@pytest.mark.parametrize("algo", ["maml", "anil", "metasgd", "protonet"])
def test_metalight_and_the_reference_compute_the_same_meta_gradient(tiny_case, algo, path):
    model, batch = tiny_case
    ours = meta_step.build_step(algo, TINY, path, copy.deepcopy(model))
    reference = meta_step.build_step(algo, TINY, "reference", copy.deepcopy(model))
    ours.meta_gradient(batch)
    reference.meta_gradient(batch)
    grads = {weight_name(k): p.grad for k, p in ours.parameters.items()}
    expected = {k: p.grad for k, p in reference.parameters.items()}
    assert grads.keys() == expected.keys()
    for k, g in expected.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("path", ["vmap", "loop"])
@pytest.mark.parametrize("algo", ["maml", "anil", "metasgd"])
def test_the_sinusoid_case_gives_the_reference_mse_meta_gradient(monkeypatch, algo, path):
    """The regression row times the same computation on both sides: the MSE meta-gradient of metalight's task interface equals the reference's."""
    # (k_shot, k_query, meta_batch, inner steps, hidden width), as meta_step.REGRESSION_CASES; "sinusoid" picks alpha 0.01
    monkeypatch.setitem(meta_step.REGRESSION_CASES, "sinusoid_tiny", (3, 2, 2, 2, 5))
    model, batch = meta_step.make_case("sinusoid_tiny", torch.device("cpu"))
    model, batch = model.double(), {k: v.double() for k, v in batch.items()}
    ours = meta_step.build_step(algo, "sinusoid_tiny", path, copy.deepcopy(model))
    reference = meta_step.build_step(algo, "sinusoid_tiny", "reference", copy.deepcopy(model))
    ours.meta_gradient(batch)
    reference.meta_gradient(batch)
    grads = {weight_name(k): p.grad for k, p in ours.parameters.items()}
    for k, p in reference.parameters.items():
        assert p.grad.abs().sum() > 0, k
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("path", ["vmap", "loop"])
@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_the_text_case_gives_the_reference_meta_gradient_and_leaves_the_table_alone(monkeypatch, algo, path):
    """The text row times the same computation on both sides: model=text_bag over the frozen pretrained table, which neither side adapts."""
    # (n_way, k_shot, k_query, meta_batch, inner steps, tokens), as meta_step.TEXT_CASES; "banking77" picks its inner LR
    monkeypatch.setitem(meta_step.TEXT_CASES, "banking77_tiny", (3, 1, 2, 2, 2, 6))
    model, batch = meta_step.make_case("banking77_tiny", torch.device("cpu"))
    model = model.double()
    ours = meta_step.build_step(algo, "banking77_tiny", path, copy.deepcopy(model))
    reference = meta_step.build_step(algo, "banking77_tiny", "reference", copy.deepcopy(model))
    ours.meta_gradient(batch)
    reference.meta_gradient(batch)
    grads = {weight_name(k): p.grad for k, p in ours.parameters.items()}
    table = "features.embedding.weight"
    assert grads[table] is None and reference.parameters[table].grad is None
    for k, p in reference.parameters.items():
        if k != table:
            assert p.grad.abs().sum() > 0, k
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-9, atol=1e-12, msg=k)
