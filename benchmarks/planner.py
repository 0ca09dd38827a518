"""Control steps per second of GrBAL's MPC planner: metalight.control.plan (one model call per horizon step over all
environments x candidates) against plan_loop (one call per candidate per step), in the same process.

    python benchmarks/planner.py [--device cpu|cuda] [--repeats 5] [--threads 1] [--cases ...] [--methods ...] [--no-memory]

* Cases (--cases; `all` runs every one): GrBAL's model on HalfCheetah, an MLP (20 + 6) -> 512 -> 512 -> 512 -> 20
  with ReLU predicting the change of the observation, at 500 candidates (run_grbal.py) and 1,000, horizon 10, for
  E = 1 and E = 5 environments planned together (their 5 rollouts in parallel), each environment with its own
  weights (torch.func.vmap over E stacked models, as a meta-learned model adapted per environment is called);
  small_200x10_e1: 2 x 128 hidden, 200 candidates. Without --cases, DEFAULT_ROWS run (every case of 500 or 200
  candidates with random shooting, GrBAL's planner, and those with E = 1 with CEM too): the loop reference of the
  others takes minutes (CEM at E = 5 and 1,000 candidates: about 25 s a control step on one core).
* Methods: random_shooting and cem (5 iterations, 10% elites, alpha 0.1: GrBAL's run-script values). The reward is
  HalfCheetah's as learning_to_adapt computes it from observations: forward velocity (change of the observation's
  third-last entry over dt = 0.01) less 0.05 |a|^2. Weights and observations are random: the cost of a control
  step does not depend on them.
* steps/s: control steps (one plan call: every environment gets an action) per second, median over --repeats calls
  after one warm-up call of plan, the two paths taking turns. Seconds are CPU time of this process on CPU (other
  jobs on a shared machine do not count; with --threads 1 it is wall time on an idle machine), wall time on GPU.
* plan peak MiB: memory of a control step of plan after a warm-up step (the loop's holds one candidate's
  activations: KiB). GPU: torch.cuda.max_memory_allocated during the step above what was allocated before. CPU: the
  bytes glibc's malloc has handed out (mallinfo2: heap in use + mapped blocks) sampled after every torch operation of
  the step (a TorchDispatchMode), above their level before: the live tensors at their peak, less the scratch an
  operation frees before it returns. (Resident-memory peaks, VmHWM after /proc/self/clear_refs as meta_step.py reads
  them, read 0 here now and then, as the kernel did not always record a peak before the step's blocks were unmapped.)
Prints a Markdown table, then one summary line.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from metalight.control import Dynamics, PlannerSettings, plan, plan_loop
from metalight.models import MLP

OBSERVATION_DIM, ACTION_DIM = 20, 6  # GrBAL's HalfCheetah (learning_to_adapt/envs/half_cheetah_env.py)
DT = 0.01  # their HalfCheetah's time step, by which the reward divides the change of position
# name: (hidden widths, candidates, horizon, environments planned together)
CASES = {
    "grbal_500x10_e1": ((512, 512, 512), 500, 10, 1),
    "grbal_500x10_e5": ((512, 512, 512), 500, 10, 5),
    "grbal_1000x10_e1": ((512, 512, 512), 1000, 10, 1),
    "grbal_1000x10_e5": ((512, 512, 512), 1000, 10, 5),
    "small_200x10_e1": ((128, 128), 200, 10, 1),
}
METHODS = ("random_shooting", "cem")
# the rows run when --cases is not given (GrBAL's planner is random shooting): about 70 s of CPU time
DEFAULT_ROWS = (
    ("grbal_500x10_e1", "random_shooting"), ("grbal_500x10_e1", "cem"), ("grbal_500x10_e5", "random_shooting"),
    ("small_200x10_e1", "random_shooting"), ("small_200x10_e1", "cem"),
)
PATHS = {"plan": plan, "plan_loop": plan_loop}


def make_dynamics(hidden: tuple[int, ...], envs: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Dynamics:
    """E random models obs + MLP([obs, action]), one per environment, called together by vmap over their stacked weights."""
    torch.manual_seed(0)
    models = [MLP(OBSERVATION_DIM + ACTION_DIM, OBSERVATION_DIM, hidden, init="default").to(device, dtype) for _ in range(envs)]
    weights, _ = stack_module_state(models)
    weights = {k: w.detach() for k, w in weights.items()}
    skeleton = models[0].to("meta")

    def one(w: dict[str, Tensor], observations: Tensor, actions: Tensor) -> Tensor:
        return observations + functional_call(skeleton, w, (torch.cat([observations, actions], dim=-1),))

    return lambda observations, actions: vmap(one)(weights, observations, actions)


def halfcheetah_reward(observations: Tensor, actions: Tensor, next_observations: Tensor) -> Tensor:
    """learning_to_adapt's HalfCheetahEnv.reward on batches: forward velocity less 0.05 |a|^2."""
    return (next_observations[..., -3] - observations[..., -3]) / DT - 0.05 * actions.square().sum(dim=-1)


def make_case(case: str, method: str, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[PlannerSettings, Dynamics, Tensor]:
    """The settings, E models and E random observations of `case`."""
    hidden, candidates, horizon, envs = CASES[case]
    settings = PlannerSettings(method=method, candidates=candidates, horizon=horizon)  # CEM: GrBAL's 5 iterations, 10%, 0.1
    observations = torch.randn(envs, OBSERVATION_DIM, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    return settings, make_dynamics(hidden, envs, device, dtype), observations


def clock(device: torch.device) -> float:
    """CPU time of this process on CPU, wall time after the queued kernels on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def seconds_per_step(case: str, method: str, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` control steps of each path after one warm-up, the paths taking turns."""
    settings, dynamics, observations = make_case(case, method, device)
    generator = torch.Generator(device=device).manual_seed(0)
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    plan(settings, dynamics, halfcheetah_reward, observations, generator, ACTION_DIM)  # warm-up (the loop's calls are the same)
    for _ in range(repeats):
        for path, planner in PATHS.items():
            start = clock(device)
            planner(settings, dynamics, halfcheetah_reward, observations, generator, ACTION_DIM)
            seconds[path].append(clock(device) - start)
    return seconds


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


@functools.cache
def _mallinfo2() -> Callable[[], _Mallinfo2]:
    """glibc's mallinfo2, loaded on first use (only the CPU memory column needs glibc)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2


def _malloc_bytes() -> int:
    """Bytes malloc has handed out and not taken back: in use on the heap plus mapped blocks."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


class _PeakMalloc(TorchDispatchMode):
    """The most bytes malloc has handed out at the end of any torch operation run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = _malloc_bytes()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _malloc_bytes())
        return out


def peak_mib(case: str, method: str, device: torch.device) -> float:
    """Peak memory of a control step of plan after a warm-up step, above the level before it (module docstring)."""
    settings, dynamics, observations = make_case(case, method, device)
    generator = torch.Generator(device=device).manual_seed(0)
    step = lambda: plan(settings, dynamics, halfcheetah_reward, observations, generator, ACTION_DIM)  # noqa: E731
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _PeakMalloc() as sampler:
        step()  # warm-up under the mode too: its first use allocates for good
        base = sampler.peak = _malloc_bytes()
        step()
    return (sampler.peak - base) / 2**20


def measure(case: str, method: str, device: torch.device, repeats: int, memory: bool) -> dict[str, Any]:
    """One row: median control steps per second of both paths, their ratio, and (with `memory`) plan's peak memory."""
    hidden, candidates, horizon, envs = CASES[case]
    median = {path: statistics.median(times) for path, times in seconds_per_step(case, method, device, repeats).items()}
    row: dict[str, Any] = {
        "case": case, "method": method, "E": envs, "C": candidates, "H": horizon, "hidden": "x".join(map(str, hidden)),
        "plan steps/s": 1 / median["plan"], "loop steps/s": 1 / median["plan_loop"], "ratio": median["plan_loop"] / median["plan"],
    }
    row["plan peak MiB"] = peak_mib(case, method, device) if memory else float("nan")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""

    def show(value: Any) -> str:
        if not isinstance(value, float):
            return str(value)
        return "-" if value != value else f"{value:.3g}" if value < 100 else f"{value:.0f}"

    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(show(v) for v in row.values()) + " |" for row in rows])


def main() -> None:
    """Measure every (case, method) and print the table and a summary line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cases", nargs="+", choices=[*CASES, "all"], help="default: DEFAULT_ROWS")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")
    device = torch.device(args.device)
    if args.cases:
        cases = list(CASES) if "all" in args.cases else args.cases
        todo = [(case, method) for case in cases for method in args.methods]
    else:
        todo = [(case, method) for case, method in DEFAULT_ROWS if method in args.methods]
    rows = [measure(case, method, device, args.repeats, not args.no_memory) for case, method in todo]
    print(table(rows))
    ratios = [row["ratio"] for row in rows]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(
        f"plan over plan_loop: {min(ratios):.1f}x to {max(ratios):.1f}x (median {statistics.median(ratios):.1f}x) in control steps/s, "
        f"{len(rows)} rows, medians of {args.repeats} steps, {name}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
