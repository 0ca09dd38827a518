"""Meta-step throughput of MAML, FOMAML and Reptile: metalight's vmap and loop paths against a learn2learn-style loop.

    python benchmarks/meta_step.py [--device cpu|cuda] [--repeats 5] [--threads 1] [--cases ...] [--algos ...] [--paths ...]

Prints one JSON object per line: {"algo", "case", "path", "device", "meta_batch", "tasks_per_s",
"peak_mib", "ratio_vs_reference", ...}, then one line comparing a full Lightning training step with
the raw meta-step (`"path": "lightning"`, `lightning_overhead` = extra time per step / raw time).

* Inputs are random tensors of the shapes of each case; the network is model=conv4 (64 filters on
  Omniglot, 32 on miniImageNet); k_query is 15 as in conf/data/*.yaml.
* One meta-step = adapt every task, meta-gradient, outer Adam (MAML) / SGD (Reptile) step. metalight's
  step is what MAML/Reptile.training_step computes on a step whose train metrics are not logged
  (query accuracy before adaptation is then skipped; see EpisodicModule._logging_this_step).
* reference: written here in the style of learn2learn (per task: clone the module, autograd.grad with
  create_graph for second order, query loss, backward per task; Reptile: deepcopy + torch.optim.Adam
  per task), timed in the same process. With learn2learn importable, its MAML is timed too.
* tasks_per_s: meta_batch / median seconds per meta-step over `--repeats` steps after one warm-up,
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

from metalight.algorithms.functional import InnerLoop, loop_meta_gradient, make_task_fn, run_tasks, split_state
from metalight.models import Conv4

# name: (channels, image size, n_way, k_shot, k_query, meta_batch, inner steps, conv4 filters)
CASES = {
    "omniglot_5w1s": (1, 28, 5, 1, 15, 32, 1, 64),
    "omniglot_20w1s": (1, 28, 20, 1, 15, 16, 5, 64),
    "miniimagenet_5w1s": (3, 84, 5, 1, 15, 4, 5, 32),
}
ALGOS = ("maml", "fomaml", "reptile")
PATHS = ("vmap", "loop", "reference")
# inner learning rates of the papers' configs (MAML Omniglot / miniImageNet; Reptile's Adam)
INNER_LR = {"omniglot": 0.4, "miniimagenet": 0.01, "reptile": 1e-3}


def make_case(name: str, device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    """The network and one random meta-batch of case `name` (labels class-major, as the data contract says)."""
    channels, size, n_way, k_shot, k_query, meta_batch, _, hidden = CASES[name]
    torch.manual_seed(0)
    model = Conv4(channels, n_way, hidden=hidden, image_size=size).to(device)
    batch = {
        "support_x": torch.randn(meta_batch, n_way * k_shot, channels, size, size),
        "support_y": torch.arange(n_way).repeat_interleave(k_shot).repeat(meta_batch, 1),
        "query_x": torch.randn(meta_batch, n_way * k_query, channels, size, size),
        "query_y": torch.arange(n_way).repeat_interleave(k_query).repeat(meta_batch, 1),
    }
    return model, {k: v.to(device) for k, v in batch.items()}


def inner_loop(algo: str, case: str) -> InnerLoop:
    """The training inner loop of `algo` on `case` (Reptile: Adam with beta1 = 0 on the whole support set)."""
    steps = CASES[case][6]
    if algo == "reptile":
        return InnerLoop(steps=steps, lr=INNER_LR["reptile"], optimizer="adam")
    return InnerLoop(steps=steps, lr=INNER_LR[case.split("_")[0]], first_order=algo == "fomaml")


# ---- metalight: what training_step computes, without Lightning ------------------------------------
def metalight_step(algo: str, case: str, path: str, model: nn.Module) -> Callable[[dict[str, Tensor]], None]:
    """One meta-step through metalight.algorithms.functional on `path`."""
    loop = inner_loop(algo, case)
    params, fixed = split_state(model)
    if algo == "reptile":
        task_fn = make_task_fn(model, fixed, loop, path, record="none", return_params=True)
        outer = torch.optim.SGD(model.parameters(), lr=1.0)

        def reptile(batch: dict[str, Tensor]) -> None:
            theta = {k: v.detach() for k, v in params.items()}
            phis = run_tasks(task_fn, theta, batch, None, path, second_order=False).params
            for k, p in params.items():
                p.grad = theta[k] - phis[k].mean(dim=0)
            outer.step()

        return reptile
    task_fn = make_task_fn(model, fixed, loop, path, record="last")
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def maml(batch: dict[str, Tensor]) -> None:
        outer.zero_grad(set_to_none=True)
        if path == "vmap":
            run_tasks(task_fn, params, batch, None, path, second_order=not loop.first_order).loss.mean().backward()
        else:
            grads = loop_meta_gradient(task_fn, params, batch)[1]
            sum((p * grads[k]).sum() for k, p in params.items()).backward()
        outer.step()

    return maml


# ---- reference: learn2learn-style, written for this benchmark -------------------------------------
def clone_module(module: nn.Module) -> nn.Module:
    """A structural copy whose parameters are differentiable clones of the original ones."""
    clone = copy.copy(module)
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return clone


def sgd_update(module: nn.Module, grads: dict[str, Tensor], lr: float) -> None:
    """Replace each parameter of a cloned module by p - lr * grad (keeps the graph to the original)."""
    for name, grad in grads.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = owner._modules[part]
        owner._parameters[leaf] = owner._parameters[leaf] - lr * grad


def reference_step(algo: str, case: str, model: nn.Module) -> Callable[[dict[str, Tensor]], None]:
    """One meta-step the way learn2learn's examples write it."""
    loop = inner_loop(algo, case)
    if algo == "reptile":
        outer = torch.optim.SGD(model.parameters(), lr=1.0)

        def reptile(batch: dict[str, Tensor]) -> None:
            n_tasks = batch["support_x"].shape[0]
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            for i in range(n_tasks):
                learner = copy.deepcopy(model)
                inner = torch.optim.Adam(learner.parameters(), lr=loop.lr, betas=(0.0, 0.999))
                for _ in range(loop.steps):
                    inner.zero_grad()
                    F.cross_entropy(learner(batch["support_x"][i]), batch["support_y"][i]).backward()
                    inner.step()
                for p, phi in zip(model.parameters(), learner.parameters()):
                    p.grad.add_((p.detach() - phi.detach()) / n_tasks)
            outer.step()

        return reptile
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def maml(batch: dict[str, Tensor]) -> None:
        outer.zero_grad(set_to_none=True)
        n_tasks = batch["support_x"].shape[0]
        for i in range(n_tasks):
            learner = clone_module(model)
            for _ in range(loop.steps):
                loss = F.cross_entropy(learner(batch["support_x"][i]), batch["support_y"][i])
                names, weights = zip(*learner.named_parameters())
                grads = torch.autograd.grad(loss, weights, create_graph=not loop.first_order)
                sgd_update(learner, dict(zip(names, grads)), loop.lr)
            (F.cross_entropy(learner(batch["query_x"][i]), batch["query_y"][i]) / n_tasks).backward()
        outer.step()

    return maml


def learn2learn_step(algo: str, case: str, model: nn.Module) -> Callable[[dict[str, Tensor]], None]:
    """One MAML meta-step with learn2learn itself (only when it is installed)."""
    import learn2learn

    loop = inner_loop(algo, case)
    wrapped = learn2learn.algorithms.MAML(model, lr=loop.lr, first_order=loop.first_order)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def maml(batch: dict[str, Tensor]) -> None:
        outer.zero_grad(set_to_none=True)
        n_tasks = batch["support_x"].shape[0]
        for i in range(n_tasks):
            learner = wrapped.clone()
            for _ in range(loop.steps):
                learner.adapt(F.cross_entropy(learner(batch["support_x"][i]), batch["support_y"][i]))
            (F.cross_entropy(learner(batch["query_x"][i]), batch["query_y"][i]) / n_tasks).backward()
        outer.step()

    return maml


def build_step(algo: str, case: str, path: str, model: nn.Module) -> Callable[[dict[str, Tensor]], None]:
    """The meta-step of one (algo, case, path)."""
    if path == "reference":
        return reference_step(algo, case, model)
    if path == "learn2learn":
        return learn2learn_step(algo, case, model)
    return metalight_step(algo, case, path, model)


# ---- measuring ----------------------------------------------------------------------------------
def clock(device: torch.device) -> float:
    """Seconds: on CPU this process's CPU time (fair on a machine shared with other jobs), else wall time after a sync."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def seconds_per_step(steps: dict[str, Callable[[dict[str, Tensor]], None]], batch: dict[str, Tensor], device: torch.device, repeats: int) -> dict[str, float]:
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

    from metalight.algorithms import MAML

    model, batch = make_case(case, device)
    path = "vmap" if device.type == "cuda" else "loop"
    raw = seconds_per_step({path: metalight_step("maml", case, path, model)}, batch, device, repeats)[path]

    starts: list[float] = []

    class StepClock(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            starts.append(clock(device))

    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    loop = inner_loop("maml", case)
    algorithm = MAML(make_case(case, device)[0], inner_lr=loop.lr, inner_steps=loop.steps, task_parallel=path)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=repeats + 2, inference_mode=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        callbacks=[StepClock()],
    )
    trainer.fit(algorithm, DataLoader([cpu_batch] * (repeats + 2), batch_size=None))
    starts.append(clock(device))
    fitted = statistics.median(b - a for a, b in zip(starts[1:], starts[2:]))  # after one warm-up step
    meta_batch = CASES[case][5]
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
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="reference is always timed")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning overhead measurement")
    parser.add_argument("--probe", nargs=3, metavar=("ALGO", "CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(probe_cpu_memory(*args.probe))
        return

    device = torch.device(args.device)
    paths = tuple(dict.fromkeys([*args.paths, "reference"])) + (("learn2learn",) if importlib.util.find_spec("learn2learn") else ())
    for case in args.cases:
        meta_batch = CASES[case][5]
        for algo in args.algos:
            model, batch = make_case(case, device)
            steps = {}
            for path in paths:
                if not (path == "learn2learn" and algo == "reptile"):
                    steps[path] = build_step(algo, case, path, copy.deepcopy(model))
            seconds = seconds_per_step(steps, batch, device, args.repeats)
            for path in steps:
                line = {
                    "algo": algo, "case": case, "path": path, "device": device.type, "meta_batch": meta_batch,
                    "tasks_per_s": round(meta_batch / seconds[path], 2),
                    "peak_mib": round(peak_mib(algo, case, path, device, args.threads), 1),
                    "ratio_vs_reference": round(seconds["reference"] / seconds[path], 3),
                    "threads": args.threads if device.type == "cpu" else None,
                }
                print(json.dumps(line), flush=True)
    if not args.no_lightning:
        print(json.dumps(lightning_overhead("omniglot_5w1s", device, max(args.repeats, 5) * 2)), flush=True)


if __name__ == "__main__":
    main()
