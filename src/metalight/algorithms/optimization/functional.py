"""Functional adaptation: weights as a dict, inner optimizers on that dict, one task's adapt-and-score, vmap or loop.

Nothing here mutates a module's parameters: a model is only ever called through
`torch.func.functional_call` with a dict of tensors, so the meta-parameters stay untouched and the
inner steps stay differentiable. The same per-task function runs over a meta-batch either with
`torch.func.vmap` (inner gradients by `torch.func.grad`) or in a Python loop (inner gradients by
`torch.autograd.grad`); both give the same numbers. On CPU the loop path keeps images and conv
weights channels-last (faster oneDNN kernels), and `loop_meta_gradient` differentiates each task
as soon as it is adapted, so that only one task's graph is ever held in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from metalight.errors import ConfigError
from metalight.models.step_norm import inner_step, recording_batch_statistics
from metalight.tasks.kinds import CLASSIFICATION, TaskKind

Params = dict[str, Tensor]
TaskPath = Literal["vmap", "loop"]
TASK_PARALLEL = ("auto", "vmap", "loop")
INNER_OPTIMIZERS = ("sgd", "adam")
RECORD = ("every_step", "ends", "last", "none")
LEARNED_LR = (None, "per_parameter", "per_step")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How one task's weights are adapted: optimizer, step size, steps, minibatch size, differentiability.

    batch_size=None takes the whole support set at every step (MAML); an int draws minibatches of
    that many support examples, cycling through reshuffled passes (Reptile). first_order=False keeps
    the graph of every inner step so the outer gradient goes through them (second-order MAML).
    """

    steps: int
    lr: float
    optimizer: str = "sgd"
    batch_size: int | None = None
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8
    first_order: bool = True
    # learned step sizes given to make_task_fn: None (lr), "per_parameter" (one tensor shaped like each
    # weight: Meta-SGD) or "per_step" (one vector with an entry per inner step for each weight: MAML++ LSLR)
    learned_lr: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"inner steps={self.steps!r} is not valid: use a whole number >= 0.")
        if not self.lr > 0:
            raise ConfigError(f"inner learning rate {self.lr!r} is not valid: use a number > 0, e.g. 0.4 for MAML.")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner_optimizer={self.optimizer!r} is not known: use one of {INNER_OPTIMIZERS}.")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"inner batch size {self.batch_size!r} is not valid: use a whole number >= 1 or null.")
        if self.learned_lr not in LEARNED_LR:
            raise ConfigError(f"learned_lr={self.learned_lr!r} is not known: use one of {LEARNED_LR}.")
        if self.learned_lr is not None and self.optimizer != "sgd":
            raise ConfigError(f"learned step sizes scale SGD steps: inner_optimizer={self.optimizer!r} cannot use them; use sgd.")


class TaskOutcome(NamedTuple):
    """What adapting one task (or, stacked, a meta-batch) gives back."""

    loss: Tensor  # the task kind's query loss at the adapted weights ([] per task, [B] stacked); MSL: the weighted sum
    scores: Tensor  # the task kind's query metric (accuracy, MSE) at each recorded step, in step order (the last step last)
    params: Params  # adapted weights (empty unless asked for)
    logits: Tensor  # query outputs (logits, predictions) at each recorded step [P, Q, ...] (empty unless keep_logits)
    batch_statistics: tuple[Tensor, ...] = ()  # per-step BatchNorm [mean; var] in call order (MAML++ BNRS)
    # the inner Adam's moments after the task, {"m": ..., "v": ...} (only when make_task_fn got an initial_state)
    optimizer_state: dict[str, Params] = {}


@dataclasses.dataclass
class InnerState:
    """An inner Adam's state that outlives one task: its step count and first and second moments per weight.

    supervised-reptile resets only the trainable weights between tasks; the optimizer's moments and
    step count carry on for the whole run (InnerState), and every evaluation task starts from a copy.
    """

    step: int
    m: Params
    v: Params

    @classmethod
    def zeros(cls, params: Params) -> InnerState:
        """The state of an Adam that has taken no step, for weights shaped like `params`."""
        return cls(0, {k: torch.zeros_like(v) for k, v in params.items()}, {k: torch.zeros_like(v) for k, v in params.items()})

    def to(self, device: torch.device) -> InnerState:
        """The same state with its tensors on `device`."""
        return InnerState(self.step, {k: v.to(device) for k, v in self.m.items()}, {k: v.to(device) for k, v in self.v.items()})

    def after(self, outcome_state: dict[str, Params], steps: int) -> InnerState:
        """The state a task left behind (outcome.optimizer_state, one task's) after `steps` more inner steps."""
        return InnerState(self.step + steps, dict(outcome_state["m"]), dict(outcome_state["v"]))


def split_state(module: nn.Module) -> tuple[Params, Params]:
    """The weights an inner loop adapts (trainable parameters) and what it keeps fixed (frozen ones, buffers)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    fixed = {name: p for name, p in module.named_parameters() if not p.requires_grad}
    fixed.update(dict(module.named_buffers()))
    return params, fixed


def inner_weights(module: nn.Module) -> frozenset[str]:
    """The trainable weights an inner loop adapts: all but those the model names in `not_adapted`.

    A text encoder names its 32,000-row token table there (model.adapt_embeddings=false): a trainable one
    is then meta-learned by the outer loop alone, at its meta-values in every inner step.
    """
    kept = set(getattr(module, "not_adapted", ()))
    return frozenset(name for name in split_state(module)[0] if name not in kept)


def tracks_running_stats(module: nn.Module) -> bool:
    """True when a normalization layer keeps running statistics (updated in place in training mode)."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
        for m in module.modules()
    )


def has_convolutions(module: nn.Module) -> bool:
    """True when the network holds a convolution (an image network), False for fully connected ones."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def resolve_task_parallel(mode: str, device: torch.device, module: nn.Module) -> TaskPath:
    """The path a meta-batch takes: `vmap` or `loop`; `auto` is vmap on accelerators and for networks without convolutions, else loop.

    On CPU the loop measured faster than vmap for every convolutional benchmark case, while vmap was
    faster for the sinusoid MLP, whose tasks are tiny (benchmarks/meta_step.py); on GPUs vmap batches the
    tasks into a few large kernels. Running statistics are updated in place, which vmap cannot do, so
    they force the loop.
    """
    if mode not in TASK_PARALLEL:
        raise ConfigError(f"task_parallel={mode!r} is not known: use one of {TASK_PARALLEL}.")
    running = tracks_running_stats(module)
    if mode == "vmap" and running:
        raise ConfigError(
            "task_parallel=vmap cannot update BatchNorm running statistics in place: set "
            "model.track_running_stats=false or algo.task_parallel=loop."
        )
    if mode == "auto":
        return "loop" if running or (device.type == "cpu" and has_convolutions(module)) else "vmap"
    return mode  # type: ignore[return-value]


def _autograd_grads(loss_fn: Callable[[Params], tuple[Tensor, Any]], params: Params, create_graph: bool) -> tuple[Params, Any]:
    """Gradient of loss_fn at params by torch.autograd.grad (the loop path), and loss_fn's auxiliary output."""
    if not create_graph:
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        loss, aux = loss_fn(params)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph, materialize_grads=True)
    return dict(zip(params, grads)), aux


def _func_grads(loss_fn: Callable[[Params], tuple[Tensor, Any]], params: Params, create_graph: bool) -> tuple[Params, Any]:
    """Gradient of loss_fn at params by torch.func.grad (composes with vmap; differentiable when create_graph), and its aux."""
    if not create_graph:
        params = {k: v.detach() for k, v in params.items()}
    return torch.func.grad(loss_fn, has_aux=True)(params)


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """F.batch_norm written with elementary ops (never updates running statistics)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training or running_mean is None:
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class ElementaryBatchNorm(TorchFunctionMode):
    """Routes F.batch_norm to `_batch_norm` while active.

    In torch 2.14 the second derivative of the native batch_norm under vmap(grad) is wrong (errors
    of 1e-2 on float64 meta-gradients of every layer below a BatchNorm; first derivatives are fine).
    The same function built from mean/var/rsqrt is exact, so the vmap path uses it for second order.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def minibatch_indices(n: int, loop: InnerLoop, generator: torch.Generator) -> Tensor | None:
    """Support-set indices [steps, batch_size] for each inner step: reshuffled passes, batches may span two.

    None when every step takes the whole support set (no batch size, or one at least as large as it).
    """
    if loop.batch_size is None or loop.batch_size >= n or loop.steps == 0:
        return None
    needed = loop.steps * loop.batch_size
    passes = [torch.randperm(n, generator=generator) for _ in range(-(-needed // n))]
    return torch.cat(passes)[:needed].view(loop.steps, loop.batch_size)


def _init_state(params: Params, loop: InnerLoop, initial: InnerState | None) -> dict[str, Any]:
    """The inner optimizer's state at a task's start: a copy of `initial`, or fresh (Adam from step 0 and zero moments)."""
    if loop.optimizer == "sgd":
        return {}
    start = initial if initial is not None else InnerState.zeros(params)
    return {"step": start.step, "m": {k: start.m[k] for k in params}, "v": {k: start.v[k] for k in params}}


def _step_size(loop: InnerLoop, step_sizes: Params, name: str, step: int) -> Tensor | float:
    """The SGD step size of weight `name` at inner step `step` (from 1): loop.lr, or a learned one.

    Per-step sizes beyond the learned ones (evaluating with more steps than training) repeat the last.
    """
    if loop.learned_lr == "per_parameter":
        return step_sizes[name]
    if loop.learned_lr == "per_step":
        sizes = step_sizes[name]
        return sizes[min(step, len(sizes)) - 1]
    return loop.lr


def _update(params: Params, grads: Params, state: dict[str, Any], step: int, loop: InnerLoop, step_sizes: Params) -> Params:
    """One inner SGD or Adam step on the weight dict (Adam's state is updated in place; `step` counts this task's steps from 1).

    Adam's bias corrections use its own step count (state["step"]), which a persistent state carries
    across tasks, as torch.optim.Adam does.
    """
    if loop.optimizer == "sgd":
        return {k: p - _step_size(loop, step_sizes, k, step) * grads[k] for k, p in params.items()}
    state["step"] += 1
    beta1, beta2 = loop.betas
    step_size = loop.lr / (1 - beta1 ** state["step"])
    root_correction = (1 - beta2 ** state["step"]) ** 0.5
    new = {}
    for k, p in params.items():
        state["m"][k] = beta1 * state["m"][k] + (1 - beta1) * grads[k]
        state["v"][k] = beta2 * state["v"][k] + (1 - beta2) * grads[k] ** 2
        new[k] = p - step_size * state["m"][k] / (state["v"][k].sqrt() / root_correction + loop.eps)
    return new


def _channels_last(tensor: Tensor) -> Tensor:
    """On CPU, image batches [B, N, C, H, W] and conv weights [O, I, kH, kW] in channels-last layout.

    oneDNN's convolutions and max-pooling run 1.3-1.4x faster on channels-last activations than on
    NCHW ones on CPU (benchmarks/meta_step.py). An activation is channels-last when its input or its
    weight is, so both are converted (the weights differentiably). Anything else is left as it is.
    """
    if tensor.device.type != "cpu" or not tensor.is_floating_point() or tensor.dim() not in (4, 5):
        return tensor
    if tensor.dim() == 4:
        return tensor.to(memory_format=torch.channels_last)  # unlike .contiguous(), restrides 1-channel weights too
    return tensor.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def logits_dtype(params: Params) -> torch.dtype:
    """The floating dtype of a task's outputs: its weights' (the inputs may be integer token ids)."""
    return next((v.dtype for v in params.values() if v.is_floating_point()), torch.get_default_dtype())


def _prefixed(params: Params, prefix: str) -> Params:
    """The entries of `params` under submodule `prefix`, with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def make_task_fn(
    model: nn.Module,
    fixed: Params,
    loop: InnerLoop,
    path: TaskPath,
    *,
    record: str = "ends",
    transductive: bool = True,
    return_params: bool = False,
    keep_logits: bool = False,
    adapted: Collection[str] | None = None,
    body: str | None = None,
    step_sizes: Params | None = None,
    loss_weights: Sequence[float] | None = None,
    statistics_plan: list[tuple[nn.Module, int]] | None = None,
    initial_state: InnerState | None = None,
    kind: TaskKind = CLASSIFICATION,
) -> Callable[..., TaskOutcome]:
    """The function (params, support_x, support_y, query_x, query_y, indices) -> TaskOutcome of one task.

    It takes `loop.steps` inner steps on the support set (or on the minibatches `indices` picks),
    minimizing `kind.loss` (cross-entropy for classification, MSE for regression: the task interface,
    tasks/kinds.py), and scores the query set with `kind.score` (`record`): at every step
    ("every_step"), at step 0 and the last step ("ends"), at the last step only ("last"), or not at
    all ("none": loss 0, no scores; for
    training steps whose metrics nobody logs). transductive=False scores each query example alone,
    in a batch made of the support set and that one example, so BatchNorm never sees two of them.

    What the algorithms vary:
    * adapted: the names of the weights the inner loop changes (default: every one in `params`);
      the others stay at their meta-values but still receive meta-gradients (MAML++'s BatchNorm).
    * body: a submodule (model.<body>, then model.head) run once per task ahead of the inner loop,
      which then adapts only the head on the body's embeddings (ANIL: body="features").
    * step_sizes: the learned step sizes of loop.learned_lr, keyed by weight name (Meta-SGD, LSLR).
    * loss_weights: the multi-step loss (MAML++ MSL): the query loss after inner step j weighted by
      loss_weights[j - 1], summed, instead of the last step's loss alone.
    * statistics_plan: a list to fill with the (layer, step) of each StepBatchNorm2d forward whose batch
      statistics the outcome returns, in the same order (MAML++ BNRS); None: record nothing.
    Forwards run inside `inner_step(k)`: the support set at step k, the query set after n steps at
    max(n - 1, 0), as in the MAML++ authors' code.
    """
    if record not in RECORD:
        raise ValueError(f"record={record!r}: use one of {RECORD}")
    grads_of = _func_grads if path == "vmap" else _autograd_grads
    layout = _channels_last if path == "loop" else (lambda tensor: tensor)
    create_graph = not loop.first_order
    step_sizes = step_sizes or {}
    if loss_weights is not None and len(loss_weights) != loop.steps:
        raise ValueError(f"{len(loss_weights)} loss weights for {loop.steps} inner steps")

    def encode(params: Params, x: Tensor) -> Tensor:
        if body is None:
            return x
        return functional_call(getattr(model, body), (_prefixed(params, body), _prefixed(fixed, body)), (x,))

    def predict(params: Params, z: Tensor, step: int) -> Tensor:
        with inner_step(step):
            if body is None:
                return functional_call(model, (params, fixed), (z,))
            return functional_call(model.head, (_prefixed(params, "head"), _prefixed(fixed, "head")), (z,))

    def run(params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, indices: Tensor | None) -> TaskOutcome:
        fast = {k: v for k, v in params.items() if adapted is None or k in adapted}
        z_support = encode(params, support_x)
        z_query = encode(params, query_x) if transductive else None

        def scored(weights: Params, updates: int) -> Tensor:
            """Query outputs (logits, predictions) after `updates` inner steps."""
            merged, step = {**params, **weights}, max(updates - 1, 0)
            if transductive:
                return predict(merged, z_query, step)

            def alone(example: Tensor) -> Tensor:
                return predict(merged, encode(merged, torch.cat([support_x, example.unsqueeze(0)])), step)[-1]

            return torch.vmap(alone)(query_x)

        state = _init_state(fast, loop, initial_state)
        scores, kept, weighted = [], [], []
        with recording_batch_statistics() as records:
            for step in range(loop.steps):
                if record == "every_step" or (record == "ends" and step == 0):
                    with torch.no_grad(), recording_batch_statistics():  # a measurement: its statistics are dropped
                        logits = scored(fast, step)
                    scores.append(kind.score(logits, query_y))
                    kept.append(logits)
                rows = slice(None) if indices is None else indices[step]
                x, y = z_support[rows], support_y[rows]
                plan: list[tuple[nn.Module, int]] = []

                def support_loss(weights: Params) -> tuple[Tensor, tuple[Tensor, ...]]:
                    # batch statistics leave torch.func.grad as its aux output (a tensor kept in a list would escape it)
                    with recording_batch_statistics() as inner:
                        loss = kind.loss(predict({**params, **weights}, x, step), y)
                    plan[:] = [(layer, row) for layer, row, _ in inner]
                    return loss, tuple(stats for *_, stats in inner)

                grads, support_statistics = grads_of(support_loss, fast, create_graph)
                records.extend((layer, row, stats) for (layer, row), stats in zip(plan, support_statistics))
                # w - lr * g loses the channels-last layout of 1-channel conv weights: restore it
                fast = {k: layout(v) for k, v in _update(fast, grads, state, step + 1, loop, step_sizes).items()}
                if loss_weights is not None and step < loop.steps - 1:
                    weighted.append(loss_weights[step] * kind.loss(scored(fast, step + 1), query_y))
            if record != "none":
                logits = scored(fast, loop.steps)
        statistics: tuple[Tensor, ...] = ()
        if statistics_plan is not None:
            statistics_plan[:] = [(layer, step) for layer, step, _ in records]
            statistics = tuple(stats for *_, stats in records)
        weights_out = {**params, **fast} if return_params else {}
        moments = {"m": state["m"], "v": state["v"]} if initial_state is not None and state else {}
        if record == "none":
            blank = query_y.new_zeros((), dtype=logits_dtype(params))  # support_x may hold token ids (int64)
            return TaskOutcome(blank, blank.new_zeros(0), weights_out, blank.new_zeros(0), statistics, moments)
        scores.append(kind.score(logits.detach(), query_y))
        kept.append(logits.detach())
        loss = kind.loss(logits, query_y)
        if loss_weights is not None:
            loss = sum(weighted, loss_weights[-1] * loss)
        return TaskOutcome(loss, torch.stack(scores), weights_out, torch.stack(kept) if keep_logits else logits.new_zeros(0), statistics, moments)

    return run


def stack_outcomes(outcomes: Sequence[TaskOutcome]) -> TaskOutcome:
    """The outcomes of single tasks stacked on a new leading task dimension, as vmap returns them."""
    first = outcomes[0]
    return TaskOutcome(
        torch.stack([o.loss for o in outcomes]),
        torch.stack([o.scores for o in outcomes]),
        {k: torch.stack([o.params[k] for o in outcomes]) for k in first.params},
        torch.stack([o.logits for o in outcomes]),
        tuple(torch.stack(column) for column in zip(*(o.batch_statistics for o in outcomes))),
        {part: {k: torch.stack([o.optimizer_state[part][k] for o in outcomes]) for k in moments} for part, moments in first.optimizer_state.items()},
    )


def loop_meta_gradient(
    task_fn: Callable[..., TaskOutcome], params: Params, batch: dict[str, Tensor], extra: Params | None = None
) -> tuple[TaskOutcome, Params, Params]:
    """The loop path's gradient of the mean query loss w.r.t. params (and `extra`, e.g. learned step sizes), task by task.

    Each task is differentiated right after it is adapted, so only one task's graph is alive at a time:
    peak memory is that of one task rather than of the meta-batch, and each backward pass works on data
    still in cache. `extra` holds tensors task_fn uses by closure; their gradients come back separately.
    """
    extra = extra or {}
    inputs = tuple(_channels_last(batch[k]) for k in ("support_x", "support_y", "query_x", "query_y"))
    n_tasks = inputs[0].shape[0]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    total_extra = {k: torch.zeros_like(v) for k, v in extra.items()}
    outcomes = []
    for i in range(n_tasks):
        # converted per task, so that each task's graph ends at the leaves and is freed whole
        outcome = task_fn({k: _channels_last(v) for k, v in params.items()}, *(t[i] for t in inputs), None)
        grads = torch.autograd.grad(outcome.loss / n_tasks, (*params.values(), *extra.values()), materialize_grads=True)
        for running, g in zip((*total.values(), *total_extra.values()), grads):
            running += g
        outcomes.append(outcome._replace(loss=outcome.loss.detach()))
    return stack_outcomes(outcomes), total, total_extra


def run_tasks_carrying_state(
    task_fn_from: Callable[[InnerState], Callable[..., TaskOutcome]], params: Params, batch: dict[str, Tensor], indices: Tensor | None, state: InnerState, steps: int
) -> tuple[TaskOutcome, InnerState]:
    """The loop path with an inner optimizer state handed from each task to the next, in task order.

    task_fn_from(state) builds the task function starting from `state`; each task takes `steps` inner
    steps. Returns the stacked outcomes and the state the last task left (supervised-reptile's order).
    """
    inputs = tuple(_channels_last(batch[k]) for k in ("support_x", "support_y", "query_x", "query_y"))
    params = {k: _channels_last(v) for k, v in params.items()}
    outcomes = []
    for i in range(inputs[0].shape[0]):
        outcome = task_fn_from(state)(params, *(t[i] for t in inputs), None if indices is None else indices[i])
        state = state.after(outcome.optimizer_state, steps)
        outcomes.append(outcome)
    return stack_outcomes(outcomes), state


def run_tasks(task_fn: Callable[..., TaskOutcome], params: Params, batch: dict[str, Tensor], indices: Tensor | None, path: TaskPath, second_order: bool) -> TaskOutcome:
    """Apply task_fn to every task of a meta-batch (leading dim B) by vmap or a loop; outcomes stacked on dim 0."""
    inputs = (batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])
    if path == "vmap":
        vmapped = torch.func.vmap(task_fn, in_dims=(None, 0, 0, 0, 0, None if indices is None else 0), randomness="different")
        if second_order:
            with ElementaryBatchNorm():
                return vmapped(params, *inputs, indices)
        return vmapped(params, *inputs, indices)
    inputs = tuple(_channels_last(t) for t in inputs)
    params = {k: _channels_last(v) for k, v in params.items()}
    return stack_outcomes([task_fn(params, *(t[i] for t in inputs), None if indices is None else indices[i]) for i in range(inputs[0].shape[0])])
