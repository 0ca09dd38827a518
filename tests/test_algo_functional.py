"""The functional inner loop: exact second-order meta-gradients, FOMAML, vmap = loop, Adam, minibatches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import make_batch, tiny_conv4
from torch import Tensor, nn

from metalight.algorithms.optimization.functional import (
    InnerLoop,
    loop_meta_gradient,
    make_task_fn,
    minibatch_indices,
    resolve_task_parallel,
    run_tasks,
    split_state,
)
from metalight.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def meta_objective(model: nn.Module, batch: dict[str, Tensor], loop: InnerLoop, path: str, params=None):
    """(mean query loss, per-task outcome) of adapting every task of the batch from `params`."""
    params = split_state(model)[0] if params is None else params
    fixed = split_state(model)[1]
    outcome = run_tasks(make_task_fn(model, fixed, loop, path), params, batch, None, path, second_order=not loop.first_order)
    return outcome.loss.mean(), outcome


def meta_gradient(model: nn.Module, batch: dict[str, Tensor], loop: InnerLoop, path: str) -> list[Tensor]:
    """d(mean query loss)/d(meta-parameters) through the functional inner loop."""
    loss, _ = meta_objective(model, batch, loop, path)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def clone_with(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` whose parameters are replaced by the given (possibly non-leaf) tensors."""
    clone = copy.deepcopy(model)
    for name, tensor in weights.items():
        *path, leaf = name.split(".")
        owner = clone
        for part in path:
            owner = getattr(owner, part)
        del owner._parameters[leaf]
        setattr(owner, leaf, tensor)
    return clone


def reference_maml_gradient(model: nn.Module, batch: dict[str, Tensor], lr: float, steps: int, first_order: bool) -> list[Tensor]:
    """learn2learn-style MAML, written independently: clone per task, autograd.grad, backward per task."""
    theta = dict(model.named_parameters())
    for p in theta.values():
        p.grad = None
    n_tasks = batch["support_x"].shape[0]
    for i in range(n_tasks):
        fast = {k: v.clone() for k, v in theta.items()}
        for _ in range(steps):
            loss = F.cross_entropy(clone_with(model, fast)(batch["support_x"][i]), batch["support_y"][i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        query_loss = F.cross_entropy(clone_with(model, fast)(batch["query_x"][i]), batch["query_y"][i]) / n_tasks
        query_loss.backward()
    grads = [p.grad.clone() for p in theta.values()]
    for p in theta.values():
        p.grad = None
    return grads


def assert_close_lists(actual: list[Tensor], expected: list[Tensor], **tolerances) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerances)


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    model = tiny_conv4(dtype=F64)
    batch = make_batch(2, dtype=F64)
    loop = InnerLoop(steps=steps, lr=0.3, first_order=False)
    grads = meta_gradient(model, batch, loop, "loop")

    # directional derivative along a random direction, by central differences in float64
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=F64) for p in model.parameters()]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h = 1e-6

    def objective_at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(sign * h * d)
        with torch.no_grad():
            value = meta_objective(model, batch, InnerLoop(steps=steps, lr=0.3, first_order=True), "loop")[0].item()
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.sub_(sign * h * d)
        return value

    numeric = (objective_at(1.0) - objective_at(-1.0)) / (2 * h)
    assert abs(analytic.item() - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic.item(), numeric)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_second_order_meta_gradient_matches_reference(steps, path):
    model = tiny_conv4(dtype=F64)
    batch = make_batch(3, dtype=F64)
    ours = meta_gradient(model, batch, InnerLoop(steps=steps, lr=0.3, first_order=False), path)
    reference = reference_maml_gradient(model, batch, lr=0.3, steps=steps, first_order=False)
    assert_close_lists(ours, reference, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_first_order_is_query_gradient_at_adapted_weights(path):
    model = tiny_conv4(dtype=F64)
    batch = make_batch(3, dtype=F64)
    loop = InnerLoop(steps=2, lr=0.3, first_order=True)
    ours = meta_gradient(model, batch, loop, path)

    # adapt each task without any graph, then differentiate the query loss w.r.t. the adapted weights
    n_tasks = batch["support_x"].shape[0]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(n_tasks):
        fast = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        for _ in range(2):
            loss = F.cross_entropy(clone_with(model, fast)(batch["support_x"][i]), batch["support_y"][i])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: (v - 0.3 * g).detach().requires_grad_() for (k, v), g in zip(fast.items(), grads)}
        query_loss = F.cross_entropy(clone_with(model, fast)(batch["query_x"][i]), batch["query_y"][i])
        for acc, g in zip(expected, torch.autograd.grad(query_loss, list(fast.values()))):
            acc += g / n_tasks
    assert_close_lists(ours, expected, rtol=1e-9, atol=1e-11)
    assert_close_lists(ours, reference_maml_gradient(model, batch, 0.3, 2, first_order=True), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_vmap_and_loop_agree(first_order, dtype):
    model = tiny_conv4(n_way=5, hidden=8, size=12, dtype=dtype)
    batch = make_batch(4, n_way=5, k_shot=1, k_query=3, size=12, dtype=dtype)
    loop = InnerLoop(steps=2, lr=0.4, first_order=first_order)
    (loss_v, out_v), (loss_l, out_l) = (meta_objective(model, batch, loop, path) for path in ("vmap", "loop"))
    torch.testing.assert_close(out_v.loss, out_l.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_v.scores, out_l.scores)
    if dtype == F64:  # float32 gradients differ by rounding (grouped vs single, NCHW vs channels-last kernels)
        grads_v = torch.autograd.grad(loss_v, list(model.parameters()))
        grads_l = torch.autograd.grad(loss_l, list(model.parameters()))
        assert_close_lists(list(grads_v), list(grads_l), rtol=0, atol=1e-10)
        params, fixed = split_state(model)
        outcome, grads, _ = loop_meta_gradient(make_task_fn(model, fixed, loop, "loop"), params, batch)
        torch.testing.assert_close(outcome.loss, out_l.loss.detach())
        assert_close_lists(list(grads.values()), list(grads_l), rtol=0, atol=1e-10)


@pytest.mark.parametrize("transductive", [True, False])
def test_vmap_and_loop_agree_on_evaluation_and_reptile_weights(transductive):
    model = tiny_conv4(dtype=F64)
    batch = make_batch(3, k_shot=3, dtype=F64)
    params, fixed = split_state(model)
    params = {k: v.detach() for k, v in params.items()}
    loop = InnerLoop(steps=4, lr=0.01, optimizer="adam", batch_size=4)
    indices = torch.stack([minibatch_indices(9, loop, torch.Generator().manual_seed(i)) for i in range(3)])
    outcomes = [
        run_tasks(
            make_task_fn(model, fixed, loop, path, record="every_step", transductive=transductive, return_params=True),
            params, batch, indices, path, second_order=False,
        )
        for path in ("vmap", "loop")
    ]
    assert outcomes[0].scores.shape == (3, 5)
    torch.testing.assert_close(outcomes[0].loss, outcomes[1].loss)
    torch.testing.assert_close(outcomes[0].scores, outcomes[1].scores)
    for k in params:
        torch.testing.assert_close(outcomes[0].params[k], outcomes[1].params[k])


def test_non_transductive_scores_each_query_with_the_support_set():
    model = tiny_conv4(dtype=F64)
    batch = make_batch(1, dtype=F64)
    params, fixed = split_state(model)
    fn = make_task_fn(model, fixed, InnerLoop(steps=0, lr=0.1), "loop", transductive=False)
    outcome = fn(params, batch["support_x"][0], batch["support_y"][0], batch["query_x"][0], batch["query_y"][0], None)
    logits = torch.stack([model(torch.cat([batch["support_x"][0], q[None]]))[-1] for q in batch["query_x"][0]])
    torch.testing.assert_close(outcome.loss, F.cross_entropy(logits, batch["query_y"][0]))


def test_functional_adam_matches_torch_adam_on_minibatches():
    model = tiny_conv4(dtype=F64)
    batch = make_batch(1, k_shot=3, dtype=F64)
    loop = InnerLoop(steps=5, lr=0.01, optimizer="adam", batch_size=4, betas=(0.0, 0.999))
    indices = minibatch_indices(9, loop, torch.Generator().manual_seed(0))
    params, fixed = split_state(model)
    fn = make_task_fn(model, fixed, loop, "loop", return_params=True)
    ours = fn({k: v.detach() for k, v in params.items()}, batch["support_x"][0], batch["support_y"][0], batch["query_x"][0], batch["query_y"][0], indices)

    clone = copy.deepcopy(model)
    optimizer = torch.optim.Adam(clone.parameters(), lr=0.01, betas=(0.0, 0.999))
    for step in range(5):
        optimizer.zero_grad()
        F.cross_entropy(clone(batch["support_x"][0][indices[step]]), batch["support_y"][0][indices[step]]).backward()
        optimizer.step()
    for name, p in clone.named_parameters():
        # conv biases feed a BatchNorm: their gradient is rounding noise, which Adam scales up to ~1e-10
        torch.testing.assert_close(ours.params[name], p.detach(), rtol=1e-9, atol=1e-8)


def test_adaptation_leaves_the_meta_parameters_untouched():
    model = tiny_conv4()
    before = copy.deepcopy(model.state_dict())
    loss, _ = meta_objective(model, make_batch(2), InnerLoop(steps=3, lr=0.4, first_order=False), "loop")
    loss.backward()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_minibatches_cycle_through_reshuffled_passes():
    loop = InnerLoop(steps=5, lr=0.1, batch_size=4)
    indices = minibatch_indices(10, loop, torch.Generator().manual_seed(0))
    assert indices.shape == (5, 4)
    flat = indices.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert minibatch_indices(4, loop, torch.Generator()) is None  # batch covers the whole support set
    assert minibatch_indices(10, InnerLoop(steps=5, lr=0.1), torch.Generator()) is None


def test_task_parallel_choice():
    model = tiny_conv4()
    assert resolve_task_parallel("auto", torch.device("cpu"), model) == "loop"
    assert resolve_task_parallel("auto", torch.device("cuda"), model) == "vmap"
    assert resolve_task_parallel("vmap", torch.device("cpu"), model) == "vmap"
    tracking = tiny_conv4(track_running_stats=True)
    assert resolve_task_parallel("auto", torch.device("cuda"), tracking) == "loop"
    with pytest.raises(ConfigError, match="track_running_stats"):
        resolve_task_parallel("vmap", torch.device("cpu"), tracking)
    with pytest.raises(ConfigError, match="task_parallel='fast'"):
        resolve_task_parallel("fast", torch.device("cpu"), model)


def test_inner_loop_rejects_bad_values():
    with pytest.raises(ConfigError, match="inner_optimizer='rmsprop'"):
        InnerLoop(steps=1, lr=0.1, optimizer="rmsprop")
    with pytest.raises(ConfigError, match="steps=-1"):
        InnerLoop(steps=-1, lr=0.1)
    with pytest.raises(ConfigError, match="learning rate 0"):
        InnerLoop(steps=1, lr=0)


@pytest.mark.parametrize(("record", "n_accs"), [("every_step", 4), ("ends", 2), ("last", 1), ("none", 0)])
def test_query_scoring_modes(record, n_accs):
    model = tiny_conv4()
    params, fixed = split_state(model)
    batch = make_batch(2)
    outcome = run_tasks(make_task_fn(model, fixed, InnerLoop(steps=3, lr=0.1), "loop", record=record), params, batch, None, "loop", False)
    assert outcome.scores.shape == (2, n_accs)
    if record == "none":
        assert not outcome.loss.any()
    else:
        reference = run_tasks(make_task_fn(model, fixed, InnerLoop(steps=3, lr=0.1), "loop", record="every_step"), params, batch, None, "loop", False)
        torch.testing.assert_close(outcome.loss, reference.loss)
        torch.testing.assert_close(outcome.scores[:, -1], reference.scores[:, -1])
