"""Meta-step throughput of metalight's algorithms: their vmap and loop paths against a learn2learn-style loop.

    python benchmarks/meta_step.py [--device cpu|cuda] [--repeats 5] [--threads 1] [--cases ...] [--algos ...] [--paths ...]

Prints one JSON object per line: {"algo", "case", "path", "device", "meta_batch", "tasks_per_s",
"peak_mib", "ratio_vs_reference", "reference", ...}, then one line comparing a full Lightning training step with
the raw meta-step (`"path": "lightning"`, `lightning_overhead` = extra time per step / raw time).

* --algos: maml, fomaml, reptile (the default: the rows of RESULTS.md, within `make gpu-check`'s time
  budget) and, on request, anil, metasgd, mamlpp, protonet.
* Inputs are random tensors of the shapes of each case; the network is model=conv4 (64 filters on
  Omniglot, 32 on miniImageNet), or model=resnet12 (64-160-320-640) for a case named *_resnet12 (not
  run unless named in --cases: a meta-step takes minutes on one CPU thread); k_query is 15 as in conf/data/*.yaml.
  banking77_5w1s_bag is few-shot text (not run unless named in --cases): model=text_bag over WordLlama's frozen
  pretrained 32,000 x 256 token table (two layers of 256), 5-way 1-shot, 5 queries, meta-batch 4, utterances of
  random token ids with random lengths up to 16 tokens (BANKING77's median is about 12); every path leaves the
  frozen table alone (metalight: the model's not_adapted; the references adapt the weights that require grad).
  sinusoid_10shot is Finn et al.'s regression (model=mlp 1-40-40-1, 10 support and 10 query points, meta-batch
  25, alpha 0.01, the MSE loss everywhere: metalight's learners take it through the task interface, the
  references call it where the image cases call cross-entropy); protonet has no regression row.
* One meta-step = adapt every task, meta-gradient, outer step: Adam(lr=1e-3) over every meta-parameter
  (learned step sizes and MAML++'s per-step BatchNorm weights included), SGD(lr=1) for Reptile.
  metalight's step runs the algorithm's own code: its LightningModule, built with task_parallel = the
  path, and `compute_meta_gradient(batch, measure=False)` between zero_grad and the Adam step. That is
  what training_step computes on a step whose train metrics are not logged (query accuracy before
  adaptation is then skipped; see EpisodicModule._logging_this_step), less its finite check, clipping
  and logging, which the "lightning" line measures. Reptile's compute_meta_gradient all-reduces through
  a trainer's strategy, so its step is written here from metalight.algorithms.optimization.functional, as Reptile
  computes it on one process.
* Inner loops: the case's inner LR and steps for every gradient-based learner, Meta-SGD (whose paper
  takes one step; its step sizes start at the inner LR) and MAML++ included, so that the rows of a case
  compare. MAML++ runs with all its fixes but CA (an outer LR schedule over trainer.max_steps, which
  needs a trainer): MSL at its epoch-0 weights, BNRS, BNWB, LSLR.
* reference: written here in the style of learn2learn's examples (not their code), timed in the same
  process. Per task: MAML clones the module, adapts it with autograd.grad (create_graph for second
  order) and backpropagates the query loss; ANIL runs model.features once on the support and once on
  the query set and adapts a clone of model.head only; Meta-SGD adapts with p - alpha_p * g, its alphas
  parameters of the reference too; ProtoNets embed support and query with model.features, average each
  class's support embeddings in a Python loop and score -squared distances; Reptile deepcopies the model
  and runs torch.optim.Adam. MAML++ has no learn2learn counterpart: its ratio is against the MAML
  reference with the same inner steps (the field "reference" names the algorithm the reference path
  runs). With learn2learn importable, its MAML is timed too (maml and fomaml rows).
* ms_per_step: median milliseconds per meta-step; tasks_per_s: meta_batch / median seconds per meta-step over `--repeats` steps after one warm-up,
  the paths taking turns. Seconds are CPU time of this process on CPU (so that other jobs on a
  shared machine do not count; with --threads 1 it equals wall time on an idle machine), wall time
  on GPU.
* peak_mib: GPU: torch.cuda.max_memory_allocated during one step. CPU: how far resident memory
  peaks above its level before the step (VmHWM after resetting it), each (case, algo, path) in a
  fresh subprocess.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalight.algorithms import ANIL, MAML, EpisodicModule, MAMLpp, MetaSGD, ProtoNet
from metalight.algorithms.base import OptimizerFactory
from metalight.algorithms.optimization.functional import InnerLoop, make_task_fn, run_tasks, split_state
from metalight.models import MLP, Conv4, ResNet12
from metalight.tasks.kinds import CLASSIFICATION, REGRESSION
from metalight.text.encoders import TextBag
from metalight.text.pretrained import PAD_ID, VOCAB_SIZE

Batch = dict[str, Tensor]

# name: (channels, image size, n_way, k_shot, k_query, meta_batch, inner steps, conv4 filters)
CASES = {
    "omniglot_5w1s": (1, 28, 5, 1, 15, 32, 1, 64),
    "omniglot_20w1s": (1, 28, 20, 1, 15, 16, 5, 64),
    "miniimagenet_5w1s": (3, 84, 5, 1, 15, 4, 5, 32),
    # ResNet-12 (the filters field is unused): one task per meta-step, each costs minutes on one CPU thread
    "miniimagenet_5w1s_resnet12": (3, 84, 5, 1, 15, 1, 5, 0),
}
# name: (k_shot, k_query, meta_batch, inner steps, hidden width): Finn et al.'s sinusoid tasks on their 1-40-40-1 net
REGRESSION_CASES = {"sinusoid_10shot": (10, 10, 25, 1, 40)}
# name: (n_way, k_shot, k_query, meta_batch, inner steps, tokens per utterance at most): text tasks on model=text_bag
TEXT_CASES = {"banking77_5w1s_bag": (5, 1, 5, 4, 5, 16)}
RESNET12_SUFFIX = "_resnet12"
DEFAULT_CASES = [case for case in CASES if not case.endswith(RESNET12_SUFFIX)] + list(REGRESSION_CASES)
DEFAULT_ALGOS = ("maml", "fomaml", "reptile")
ALGOS = (*DEFAULT_ALGOS, "anil", "metasgd", "mamlpp", "protonet")
PATHS = ("vmap", "loop", "reference")
# inner learning rates of the papers' configs (MAML Omniglot / miniImageNet; Reptile's Adam), for every
# gradient-based learner: the rows of one case then differ only in the algorithm
INNER_LR = {"omniglot": 0.4, "miniimagenet": 0.01, "sinusoid": 0.01, "banking77": 0.1, "reptile": 1e-3}
# the LightningModules of the learners with a gradient inner loop (MAML++'s CA schedule needs a trainer: off)
LEARNERS = {"maml": MAML, "fomaml": MAML, "anil": ANIL, "metasgd": MetaSGD, "mamlpp": functools.partial(MAMLpp, ca=False)}
ADAM = functools.partial(torch.optim.Adam, lr=1e-3)  # the outer optimizer of every algorithm but Reptile
OUTER_SGD = functools.partial(torch.optim.SGD, lr=1.0)  # Reptile's: the step is then exactly theta - mean phi


def task_loss_of(case: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss every path of `case` minimizes: cross-entropy on images, the MSE on regression tasks."""
    return REGRESSION.loss if case in REGRESSION_CASES else F.cross_entropy


def meta_batch_of(case: str) -> int:
    """Tasks per meta-step of `case`."""
    if case in TEXT_CASES:
        return TEXT_CASES[case][3]
    return REGRESSION_CASES[case][2] if case in REGRESSION_CASES else CASES[case][5]


def n_way_of(case: str) -> int:
    """Classes per task of a classification case."""
    return TEXT_CASES[case][0] if case in TEXT_CASES else CASES[case][2]


def token_ids(n_tasks: int, n_utterances: int, length: int, generator: torch.Generator) -> Tensor:
    """Random utterances [B, n, length]: ids 1..VOCAB_SIZE-1, each of a random length 1..length, padded with PAD_ID at the end."""
    ids = torch.randint(1, VOCAB_SIZE, (n_tasks, n_utterances, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n_tasks, n_utterances, 1), generator=generator)
    return ids.masked_fill(torch.arange(length) >= lengths, PAD_ID)


def make_case(name: str, device: torch.device) -> tuple[nn.Module, Batch]:
    """The network and one random meta-batch of case `name` (labels class-major, as the data contract says)."""
    torch.manual_seed(0)
    if name in REGRESSION_CASES:
        k_shot, k_query, meta_batch, _, width = REGRESSION_CASES[name]
        x = torch.rand(meta_batch, k_shot + k_query, 1) * 10 - 5
        y = (torch.rand(meta_batch, 1, 1) * 4.9 + 0.1) * torch.sin(x - torch.rand(meta_batch, 1, 1) * torch.pi)
        batch = {"support_x": x[:, :k_shot], "support_y": y[:, :k_shot], "query_x": x[:, k_shot:], "query_y": y[:, k_shot:]}
        return MLP(1, 1, [width, width]).to(device), {k: v.to(device) for k, v in batch.items()}
    if name in TEXT_CASES:
        n_way, k_shot, k_query, meta_batch, _, length = TEXT_CASES[name]
        generator = torch.Generator().manual_seed(0)
        batch = {
            "support_x": token_ids(meta_batch, n_way * k_shot, length, generator),
            "support_y": torch.arange(n_way).repeat_interleave(k_shot).repeat(meta_batch, 1),
            "query_x": token_ids(meta_batch, n_way * k_query, length, generator),
            "query_y": torch.arange(n_way).repeat_interleave(k_query).repeat(meta_batch, 1),
        }
        return TextBag(n_way).to(device), {k: v.to(device) for k, v in batch.items()}
    channels, size, n_way, k_shot, k_query, meta_batch, _, hidden = CASES[name]
    if name.endswith(RESNET12_SUFFIX):
        model = ResNet12(channels, n_way, image_size=size).to(device)
    else:
        model = Conv4(channels, n_way, hidden=hidden, image_size=size).to(device)
    batch = {
        "support_x": torch.randn(meta_batch, n_way * k_shot, channels, size, size),
        "support_y": torch.arange(n_way).repeat_interleave(k_shot).repeat(meta_batch, 1),
        "query_x": torch.randn(meta_batch, n_way * k_query, channels, size, size),
        "query_y": torch.arange(n_way).repeat_interleave(k_query).repeat(meta_batch, 1),
    }
    return model, {k: v.to(device) for k, v in batch.items()}


def inner_loop(algo: str, case: str) -> InnerLoop:
    """The training inner loop of `algo` on `case`: SGD of the case's LR (Reptile: Adam with beta1 = 0), whole support set."""
    steps = REGRESSION_CASES[case][3] if case in REGRESSION_CASES else TEXT_CASES[case][4] if case in TEXT_CASES else CASES[case][6]
    if algo == "reptile":
        return InnerLoop(steps=steps, lr=INNER_LR["reptile"], optimizer="adam")
    return InnerLoop(steps=steps, lr=INNER_LR[case.split("_")[0]], first_order=algo == "fomaml")


# ---- metalight: the algorithms' own meta-step, without a Trainer -----------------------------------
class MetaStep:
    """One meta-step: zero the grads, `meta_gradient(batch)` leaves the meta-gradient in .grad, the outer optimizer steps.

    The meta-gradient is kept apart from the step, and the parameters by name, so that a test can
    compare what metalight and the reference compute on the same batch.
    """

    def __init__(self, parameters: dict[str, nn.Parameter], meta_gradient: Callable[[Batch], Any], optimizer: OptimizerFactory = ADAM) -> None:
        self.parameters = parameters
        self.meta_gradient = meta_gradient
        self.optimizer = optimizer(list(parameters.values()))

    def __call__(self, batch: Batch) -> None:
        """The timed unit: what one outer step of training costs, zero_grad to optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_gradient(batch)
        self.optimizer.step()


def build_algorithm(algo: str, case: str, path: str, model: nn.Module) -> EpisodicModule:
    """metalight's LightningModule of `algo` on `path`, with the case's inner loop (it may rebuild `model`: MAML++, ProtoNets)."""
    if algo == "protonet":
        return ProtoNet(model, task_parallel=path)
    loop = inner_loop(algo, case)
    algorithm = LEARNERS[algo](model, inner_lr=loop.lr, inner_steps=loop.steps, first_order=loop.first_order, task_parallel=path)
    if case in REGRESSION_CASES:
        algorithm.use_task_kind(REGRESSION)
    return algorithm


def metalight_step(algo: str, case: str, path: str, model: nn.Module) -> MetaStep:
    """One meta-step through the algorithm's compute_meta_gradient, then Adam over all its parameters."""
    # built before its parameters are taken: MAML++ swaps BatchNorm for per-step BatchNorm and adds step sizes
    algorithm = build_algorithm(algo, case, path, model).to(next(model.parameters()).device)
    # Lightning's manual_backward needs a Trainer; on one device in 32-bit precision it comes down to loss.backward()
    algorithm.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    return MetaStep(dict(algorithm.named_parameters()), lambda batch: algorithm.compute_meta_gradient(batch, measure=False))


def reptile_step(case: str, path: str, model: nn.Module) -> MetaStep:
    """Reptile's meta-step as Reptile.compute_meta_gradient takes it on one process (its own all-reduces through a trainer)."""
    loop = inner_loop("reptile", case)
    params, fixed = split_state(model)
    kind = REGRESSION if case in REGRESSION_CASES else CLASSIFICATION
    task_fn = make_task_fn(model, fixed, loop, path, record="none", return_params=True, kind=kind)

    def meta_gradient(batch: Batch) -> None:
        theta = {k: v.detach() for k, v in params.items()}
        phis = run_tasks(task_fn, theta, batch, None, path, second_order=False).params
        for k, p in params.items():
            p.grad = theta[k] - phis[k].mean(dim=0)

    return MetaStep(params, meta_gradient, OUTER_SGD)


# ---- reference: learn2learn-style, written for this benchmark -------------------------------------
def clone_module(module: nn.Module) -> nn.Module:
    """A structural copy whose parameters are differentiable clones of the original ones."""
    clone = copy.copy(module)
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return clone


def set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    """Put `value` (a non-leaf tensor, keeping its graph) in place of parameter `name` of a cloned module."""
    *path, leaf = name.split(".")
    for part in path:
        module = module._modules[part]
    module._parameters[leaf] = value


def inner_sgd(learner: nn.Module, x: Tensor, y: Tensor, loop: InnerLoop, lr: float | dict[str, Tensor], loss: Callable = F.cross_entropy) -> None:
    """loop.steps SGD steps of a cloned module on (x, y): w - lr * g, lr one number or one tensor per weight (Meta-SGD).

    Only the weights that require grad adapt (a frozen token table stays as it is)."""
    for _ in range(loop.steps):
        names, weights = zip(*((n, w) for n, w in learner.named_parameters() if w.requires_grad))
        grads = torch.autograd.grad(loss(learner(x), y), weights, create_graph=not loop.first_order)
        for name, weight, grad in zip(names, weights, grads):
            set_parameter(learner, name, weight - (lr[name] if isinstance(lr, dict) else lr) * grad)


def per_task(task_loss: Callable[[Batch], Tensor]) -> Callable[[Batch], None]:
    """learn2learn's outer loop: each task's query loss / B is backpropagated as soon as the task is adapted."""

    def meta_gradient(batch: Batch) -> None:
        n_tasks = batch["support_x"].shape[0]
        for i in range(n_tasks):
            (task_loss({k: v[i] for k, v in batch.items()}) / n_tasks).backward()

    return meta_gradient


def sgd_reference(model: nn.Module, loop: InnerLoop, step_sizes: dict[str, nn.Parameter] | None = None, loss: Callable = F.cross_entropy) -> MetaStep:
    """Per task: clone the model, adapt it with SGD (loop.lr, or learned per-weight step_sizes), query loss."""

    def task_loss(task: Batch) -> Tensor:
        learner = clone_module(model)
        inner_sgd(learner, task["support_x"], task["support_y"], loop, loop.lr if step_sizes is None else step_sizes, loss)
        return loss(learner(task["query_x"]), task["query_y"])

    learned = {f"step_sizes.{name}": alpha for name, alpha in (step_sizes or {}).items()}
    return MetaStep({**dict(model.named_parameters()), **learned}, per_task(task_loss))


def maml_reference(algo: str, case: str, model: nn.Module) -> MetaStep:
    """MAML or FOMAML; MAML++'s reference too (learn2learn has no MAML++): MAML with the same inner loop."""
    return sgd_reference(model, inner_loop(algo, case), loss=task_loss_of(case))


def metasgd_reference(algo: str, case: str, model: nn.Module) -> MetaStep:
    """Meta-SGD: a step size per weight entry, starting at the inner LR, meta-learned with the weights."""
    loop = inner_loop(algo, case)
    sizes = {name: nn.Parameter(torch.full_like(p, loop.lr)) for name, p in model.named_parameters() if p.requires_grad}
    return sgd_reference(model, loop, sizes, task_loss_of(case))


def anil_reference(algo: str, case: str, model: nn.Module) -> MetaStep:
    """ANIL: the body once on the support and once on the query set, a clone of the head adapted on the embeddings."""
    loop, loss = inner_loop(algo, case), task_loss_of(case)

    def task_loss(task: Batch) -> Tensor:
        support, query = model.features(task["support_x"]), model.features(task["query_x"])
        head = clone_module(model.head)
        inner_sgd(head, support, task["support_y"], loop, loop.lr, loss)
        return loss(head(query), task["query_y"])

    return MetaStep(dict(model.named_parameters()), per_task(task_loss))


def protonet_reference(algo: str, case: str, model: nn.Module) -> MetaStep:
    """ProtoNets: support and query embedded as one batch, prototypes as class means, logits -squared distances."""
    n_way = n_way_of(case)

    def task_loss(task: Batch) -> Tensor:
        n_support = len(task["support_x"])
        embedded = model.features(torch.cat([task["support_x"], task["query_x"]]))
        support, query = embedded[:n_support], embedded[n_support:]
        centers = torch.stack([support[task["support_y"] == c].mean(dim=0) for c in range(n_way)])
        logits = -(query.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(dim=2)
        return F.cross_entropy(logits, task["query_y"])

    return MetaStep({k: p for k, p in model.named_parameters() if k.startswith("features.")}, per_task(task_loss))


def reptile_reference(algo: str, case: str, model: nn.Module) -> MetaStep:
    """Reptile: per task a deepcopy trained by torch.optim.Adam; .grad = theta - mean of the adapted weights."""
    loop, loss = inner_loop(algo, case), task_loss_of(case)

    def meta_gradient(batch: Batch) -> None:
        n_tasks = batch["support_x"].shape[0]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for i in range(n_tasks):
            learner = copy.deepcopy(model)
            inner = torch.optim.Adam(learner.parameters(), lr=loop.lr, betas=(0.0, 0.999))
            for _ in range(loop.steps):
                inner.zero_grad()
                loss(learner(batch["support_x"][i]), batch["support_y"][i]).backward()
                inner.step()
            for p, phi in zip(model.parameters(), learner.parameters()):
                p.grad.add_((p.detach() - phi.detach()) / n_tasks)

    return MetaStep(dict(model.named_parameters()), meta_gradient, OUTER_SGD)


def learn2learn_step(algo: str, case: str, model: nn.Module) -> MetaStep:
    """One MAML meta-step with learn2learn itself (only when it is installed)."""
    import learn2learn

    loop, loss = inner_loop(algo, case), task_loss_of(case)
    wrapped = learn2learn.algorithms.MAML(model, lr=loop.lr, first_order=loop.first_order)

    def task_loss(task: Batch) -> Tensor:
        learner = wrapped.clone()
        for _ in range(loop.steps):
            learner.adapt(loss(learner(task["support_x"]), task["support_y"]))
        return loss(learner(task["query_x"]), task["query_y"])

    return MetaStep(dict(model.named_parameters()), per_task(task_loss))


REFERENCES = {
    "maml": maml_reference, "fomaml": maml_reference, "mamlpp": maml_reference, "anil": anil_reference,
    "metasgd": metasgd_reference, "protonet": protonet_reference, "reptile": reptile_reference,
}
# the algorithm each reference path runs, where it is not the row's own ("reference" in the JSON lines)
REFERENCE_ALGO = {"mamlpp": "maml"}


def build_step(algo: str, case: str, path: str, model: nn.Module) -> MetaStep:
    """The meta-step of one (algo, case, path)."""
    if path == "reference":
        return REFERENCES[algo](algo, case, model)
    if path == "learn2learn":
        return learn2learn_step(algo, case, model)
    if algo == "reptile":
        return reptile_step(case, path, model)
    return metalight_step(algo, case, path, model)


def paths_of(algo: str, requested: list[str]) -> list[str]:
    """The requested paths, the reference always, and learn2learn's own MAML for maml/fomaml where it is installed."""
    paths = list(dict.fromkeys([*requested, "reference"]))
    if algo in ("maml", "fomaml") and importlib.util.find_spec("learn2learn"):
        paths.append("learn2learn")
    return paths


# ---- measuring ----------------------------------------------------------------------------------
def clock(device: torch.device) -> float:
    """Seconds: on CPU this process's CPU time (fair on a machine shared with other jobs), else wall time after a sync."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def seconds_per_step(steps: dict[str, Callable[[Batch], None]], batch: Batch, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of one meta-step per path; paths take turns (side by side) after one warm-up step each."""
    for step in steps.values():
        step(batch)
    times: dict[str, list[float]] = {path: [] for path in steps}
    for _ in range(repeats):
        for path, step in steps.items():
            start = clock(device)
            step(batch)
            times[path].append(clock(device) - start)
    return {path: statistics.median(values) for path, values in times.items()}


def _status_kib(field: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/self/status, in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_mib(algo: str, case: str, path: str, device: torch.device, threads: int) -> float:
    """Peak memory of one meta-step: CUDA allocator peak, or on CPU the peak RSS rise in a fresh process."""
    if device.type == "cuda":
        model, batch = make_case(case, device)
        step = build_step(algo, case, path, model)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(batch)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    probe = [sys.executable, __file__, "--probe", algo, case, path, "--threads", str(threads)]
    done = subprocess.run(probe, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def probe_cpu_memory(algo: str, case: str, path: str) -> float:
    """In a fresh process: how far resident memory peaks above its level before the first meta-step (MiB)."""
    model, batch = make_case(case, torch.device("cpu"))
    step = build_step(algo, case, path, model)
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM (the peak) to the current RSS
        handle.write("5")
    before = _status_kib("VmRSS")
    step(batch)
    return (_status_kib("VmHWM") - before) / 1024


def lightning_overhead(case: str, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds per step of Trainer.fit on MAML vs the raw meta-step, same model, batch and path."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    model, batch = make_case(case, device)
    path = "vmap" if device.type == "cuda" else "loop"
    raw = seconds_per_step({path: metalight_step("maml", case, path, model)}, batch, device, repeats)[path]

    starts: list[float] = []

    class StepClock(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            starts.append(clock(device))

    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    algorithm = build_algorithm("maml", case, path, make_case(case, device)[0])
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=repeats + 2, inference_mode=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        callbacks=[StepClock()],
    )
    trainer.fit(algorithm, DataLoader([cpu_batch] * (repeats + 2), batch_size=None))
    starts.append(clock(device))
    fitted = statistics.median(b - a for a, b in zip(starts[1:], starts[2:]))  # after one warm-up step
    meta_batch = meta_batch_of(case)
    return {
        "algo": "maml", "case": case, "path": "lightning", "task_path": path, "device": device.type,
        "meta_batch": meta_batch, "tasks_per_s": round(meta_batch / fitted, 2),
        "raw_tasks_per_s": round(meta_batch / raw, 2), "lightning_overhead": round(fitted / raw - 1, 4),
    }


def main() -> None:
    """Parse arguments, run every (case, algo, path), print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fair on a shared machine)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=[*CASES, *REGRESSION_CASES, *TEXT_CASES], help="default: %(default)s")
    parser.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS), choices=ALGOS, help="default: %(default)s")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="reference is always timed")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning overhead measurement")
    parser.add_argument("--probe", nargs=3, metavar=("ALGO", "CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(probe_cpu_memory(*args.probe))
        return

    device = torch.device(args.device)
    for case in args.cases:
        meta_batch = meta_batch_of(case)
        for algo in args.algos:
            if algo == "protonet" and case in REGRESSION_CASES:
                continue  # class prototypes: no regression row
            model, batch = make_case(case, device)
            steps = {path: build_step(algo, case, path, copy.deepcopy(model)) for path in paths_of(algo, args.paths)}
            seconds = seconds_per_step(steps, batch, device, args.repeats)
            for path in steps:
                line = {
                    "algo": algo, "case": case, "path": path, "device": device.type, "meta_batch": meta_batch,
                    "ms_per_step": round(1000 * seconds[path], 1), "tasks_per_s": round(meta_batch / seconds[path], 2),
                    "peak_mib": round(peak_mib(algo, case, path, device, args.threads), 1),
                    "ratio_vs_reference": round(seconds["reference"] / seconds[path], 3),
                    "reference": REFERENCE_ALGO.get(algo, algo),
                    "threads": args.threads if device.type == "cpu" else None,
                }
                print(json.dumps(line), flush=True)
    if not args.no_lightning:
        print(json.dumps(lightning_overhead("omniglot_5w1s", device, max(args.repeats, 5) * 2)), flush=True)


if __name__ == "__main__":
    main()
