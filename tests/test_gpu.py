"""The promises of the CPU suite, on the GPU: vmap = loop, exact meta-gradients, learning, checkpoints that move
between devices, resume, DDP over GPUs.

Each test runs on every device this machine has: the CPU always (so that its code runs in every suite, at a
cost of a few seconds), CUDA where there is a GPU. The CUDA cases carry the `gpu` marker (`pytest -m gpu`,
or `make gpu-check`) and are skipped, saying why, without one. The figures worth reading on a GPU
(largest differences, accuracies) are recorded as junit properties, which `make gpu-check` prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from algo_tasks import make_batch, tiny_conv4
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf, open_dict
from test_algo_functional import meta_gradient, meta_objective

from metalight.algorithms.optimization.functional import InnerLoop
from metalight.runs.checkpoints import load_checkpoint
from metalight.apply.evaluation import evaluate
from metalight.models import Conv4
from metalight.runs.training import train

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: extra threads only slow them down

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NEEDS_CUDA = pytest.mark.skipif(GPUS == 0, reason="CUDA is not available here (no NVIDIA GPU or driver): run on a GPU machine, e.g. `make gpu-check`")
ON_GPU = [pytest.mark.gpu, NEEDS_CUDA]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu"}
# a run of a few tiny meta-steps through the real configs and data
TINY = [
    "data.batches_per_epoch=4", "data.meta_batch_size=2", "data.k_query=2", "data.n_val_tasks=2", "data.n_test_tasks=4",
    "data.eval_batch_size=2", "model.hidden=8", "algo.eval_inner_steps=1", "callbacks.last_checkpoint.every_n_steps=1",
    "logger=csv",
]


@pytest.fixture
def full_float32():
    """Plain float32 on CUDA for the length of a test: TF32 convolutions and matmuls (cuDNN's default) off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ---- the functional inner loop ----------------------------------------------------------------------------
def _case(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """tiny: the CPU test's network and tasks; omniglot: MAML's Omniglot conv4 (64 filters, 28x28, 5-way 1-shot, 15 queries)."""
    if name == "tiny":
        return tiny_conv4(n_way=5, hidden=8, size=12, dtype=dtype).to(device), _to(make_batch(4, n_way=5, k_shot=1, k_query=3, size=12, dtype=dtype), device)
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=64, image_size=28, pool=False).to(device, dtype)
    return model, _to(make_batch(8, n_way=5, k_shot=1, k_query=15, size=28, dtype=dtype), device)


# vmap runs grouped convolutions, loop one task at a time: sums run in another order. Gradients are compared
# as one vector (relative to its norm): conv biases feeding a BatchNorm have gradients of pure rounding noise
TOLERANCE = {torch.float32: dict(loss=1e-5, grads=1e-4), F64: dict(loss=1e-10, grads=1e-10)}


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("where", ["cpu-tiny", pytest.param("cuda-tiny", marks=ON_GPU), pytest.param("cuda-omniglot", marks=ON_GPU)])
def test_vmap_and_loop_agree(where, dtype, full_float32, record_property):
    device, case = where.split("-")
    model, batch = _case(case, device, dtype)
    loop = InnerLoop(steps=2, lr=0.4, first_order=False)
    (loss_v, out_v), (loss_l, out_l) = (meta_objective(model, batch, loop, path) for path in ("vmap", "loop"))
    grads_v, grads_l = (torch.autograd.grad(loss, list(model.parameters())) for loss in (loss_v, loss_l))
    flat_v, flat_l = (torch.cat([g.flatten() for g in grads]) for grads in (grads_v, grads_l))
    grad_error = float(torch.linalg.vector_norm(flat_v - flat_l) / torch.linalg.vector_norm(flat_l))
    record_property("max_abs_loss_diff", float((out_v.loss - out_l.loss).detach().abs().max()))
    record_property("relative_grad_diff", grad_error)
    torch.testing.assert_close(out_v.loss, out_l.loss, rtol=0, atol=TOLERANCE[dtype]["loss"])
    # a query scored differently changes an accuracy by 1 / queries: rounding may flip a near-tie, no more
    torch.testing.assert_close(out_v.scores, out_l.scores, rtol=0, atol=1.01 / batch["query_y"].shape[1])
    assert grad_error <= TOLERANCE[dtype]["grads"], grad_error


@pytest.mark.parametrize("path", ["loop", "vmap"])
@pytest.mark.parametrize("device", DEVICES)
def test_second_order_meta_gradient_matches_finite_differences(device, path, record_property):
    model = tiny_conv4(dtype=F64).to(device)
    batch = _to(make_batch(2, dtype=F64), device)
    loop = InnerLoop(steps=3, lr=0.3, first_order=False)
    grads = meta_gradient(model, batch, loop, path)

    # directional derivative along a random direction, by central differences in float64
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=F64).to(device) for p in model.parameters()]
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    h = 1e-6

    @torch.no_grad()
    def objective_at(sign: float) -> float:
        for p, d in zip(model.parameters(), direction):
            p.add_(sign * h * d)
        value = meta_objective(model, batch, InnerLoop(steps=3, lr=0.3, first_order=True), path)[0].item()
        for p, d in zip(model.parameters(), direction):
            p.sub_(sign * h * d)
        return value

    numeric = (objective_at(1.0) - objective_at(-1.0)) / (2 * h)
    record_property("relative_error", abs(analytic - numeric) / max(1.0, abs(numeric)))
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


# ---- through the configs: learning, checkpoints, resume, DDP ------------------------------------------------
def _run(compose_in, folder: Path, device: str, *overrides: str) -> tuple[dict, dict]:
    """train() of the composed config on `device` in `folder` (with .hydra/config.yaml, as eval.py needs)."""
    cfg = compose_in(folder, *overrides, accelerator=ACCELERATOR[device])
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, folder / ".hydra" / "config.yaml")
    return train(cfg)


@pytest.mark.gpu
@pytest.mark.slow
@NEEDS_CUDA
def test_quick_omniglot_learns_on_the_gpu(compose_in, tmp_path, record_property):
    # what test_experiments.py asks of the same 200 meta-steps on the CPU: chance is 0.20, the untrained
    # network adapted with 3 inner steps scores 0.51, a working MAML 0.86
    metrics, _ = _run(
        compose_in, tmp_path / "quick", "cuda", "experiment=quick_omniglot", "trainer.max_steps=200",
        "data.batches_per_epoch=100", "data.n_val_tasks=50", "data.n_test_tasks=100", "logger=csv",
    )
    record_property("test_acc", metrics["test/acc"])
    record_property("test_acc_before", metrics["test/acc_before"])
    assert metrics["test/acc"] > 0.78, metrics
    assert metrics["test/acc_before"] < 0.3, metrics


class KeepStep(Callback):
    """Copy last.ckpt to `<step>.ckpt` once meta-step `step` has saved it (a run interrupted there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if trainer.global_step == self.step:  # saved at the end of the previous meta-step
            shutil.copy(last, last.with_name(f"{self.step}.ckpt"))


class StartState(Callback):
    """Where fit() starts: the global step and the weights (on the CPU) when training begins."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        self.weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


@pytest.fixture(scope="module")
def runs(compose_in, tmp_path_factory):
    """runs(device): 4 tiny meta-steps then test, keeping the checkpoint of step 2; and a run resumed from it to 4.

    Both with trainer.deterministic=warn (see the resume test); made once per device for this module.
    """
    made: dict[str, dict] = {}
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn, cublas = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark), os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def get(device: str) -> dict:
        if device not in made:
            root = tmp_path_factory.mktemp(f"runs_{device}")
            common = [*TINY, "trainer.max_steps=4", "trainer.deterministic=warn"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                metrics, reference = _run(compose_in, root / "reference", device, *common, "+callbacks.keep._target_=test_gpu.KeepStep", "+callbacks.keep.step=2")
                interrupted = root / "reference" / "checkpoints" / "2.ckpt"
                _, resumed = _run(compose_in, root / "resumed", device, *common, f"ckpt_path={interrupted}", "test=false", "+callbacks.start._target_=test_gpu.StartState")
            nondeterministic = sorted({str(w.message).split(" does not")[0] for w in caught if "does not have a deterministic" in str(w.message)})
            made[device] = dict(metrics=metrics, reference=reference, resumed=resumed, interrupted=interrupted, nondeterministic=nondeterministic)
        return made[device]

    yield get
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)  # set by Lightning for the deterministic runs


@pytest.mark.parametrize(("written_on", "read_on"), [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=ON_GPU), pytest.param("cpu", "cuda", marks=ON_GPU)])
def test_checkpoint_evaluates_on_another_device(runs, compose_train, monkeypatch, written_on, read_on, record_property):
    written = runs(written_on)
    checkpoint = written["reference"]["trainer"].checkpoint_callback.best_model_path
    assert load_checkpoint(checkpoint)["state_dict"]  # a plain dict that loads on the CPU, whatever wrote it
    monkeypatch.setattr("metalight.apply.evaluation._overrides", lambda: [])
    results = evaluate(compose_train(f"ckpt_path={checkpoint}", config_name="eval", accelerator=ACCELERATOR[read_on]))
    expected = written["metrics"]
    record_property("acc_diff", abs(results["acc"] - expected["test/acc"]))
    assert results["n_tasks"] == 4
    if written_on == read_on:
        assert results["acc"] == pytest.approx(expected["test/acc"], abs=1e-6)
    else:  # float32 on two devices (TF32 convolutions on the GPU): a near-tie may flip one of the 40 queries
        assert results["acc"] == pytest.approx(expected["test/acc"], abs=1.01 / 40)
        assert results["loss"] == pytest.approx(expected["test/loss"], rel=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_from_the_saved_step_with_the_same_weights(runs, device, record_property):
    """Meta-steps 3 and 4 resumed from step 2's checkpoint end where 4 uninterrupted ones do. Tolerance: none.

    Restoring is a copy (bitwise on any device). The continuation is bitwise too when every kernel is
    deterministic: always on the CPU; on CUDA with trainer.deterministic=warn, which makes cuDNN choose
    deterministic convolution algorithms and warns about any op that has none (listed in the failure). With
    the default kernels (deterministic=false) cuDNN may pick weight-gradient algorithms that sum with atomics,
    and then no useful tolerance can be promised: a conv bias that feeds a BatchNorm has a gradient of pure
    rounding noise, which Adam turns into steps of up to about the learning rate, either way, every meta-step.
    """
    done = runs(device)
    saved, start = load_checkpoint(done["interrupted"]), next(c for c in done["resumed"]["trainer"].callbacks if isinstance(c, StartState))
    assert saved["global_step"] == start.step == 2
    for name, value in saved["state_dict"].items():
        assert torch.equal(start.weights[name], value), f"{name} is not what was saved"

    reference, resumed = (done[name]["algorithm"].state_dict() for name in ("reference", "resumed"))
    assert done["resumed"]["trainer"].global_step == 4
    record_property("nondeterministic_ops", ", ".join(done["nondeterministic"]) or "none")
    record_property("max_abs_weight_diff", _max_diff([v.float() for v in reference.values()], [v.float() for v in resumed.values()]))
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), f"{name} differs after resuming at step 2 (ops without a deterministic kernel: {done['nondeterministic']})"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(GPUS < 2, reason=f"DDP over GPUs needs 2 of them, this machine has {GPUS}")
def test_ddp_over_two_gpus(tmp_path, data_dir, cache_dir):
    """trainer=ddp on 2 GPUs (NCCL): both processes share one run folder, train, save and test."""
    run = tmp_path / "run"
    env = dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    command = [
        sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", "trainer=ddp", "trainer.devices=2", *TINY,
        "trainer.max_steps=4", "data.meta_batch_size=4", "data.num_workers=0", "data.persistent_workers=false",
        "++trainer.enable_progress_bar=false",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "distributed_backend=nccl" in output, output[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert (run / "results.json").is_file()
