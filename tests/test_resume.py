"""A run interrupted mid-epoch and resumed from its last.ckpt ends with the very state of an uninterrupted run,
for each kind of state a learner keeps (ALGORITHMS).

Some of them (KILLED) are real `python train.py` processes killed with SIGKILL, started together: whatever was on
disk is all there is. The others die in this process: an exception raised after meta-step STOP ends the run with
no checkpoint but those already written, as a kill would, without a process start each. The resumed and the
uninterrupted runs go through the same `train()` in this process (one thread everywhere, so the same arithmetic).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import open_dict

from metalight.runs.checkpoints import load_checkpoint
from metalight.errors import CheckpointError
from metalight.runs.training import train

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
# what every run shares: a checkpoint after every meta-step, no test, the CPU
COMMON = [
    f"trainer.max_steps={MAX_STEPS}", "data.batches_per_epoch=4", "++trainer.enable_progress_bar=false",
    "callbacks.last_checkpoint.every_n_steps=1", "logger=csv", "test=false", "trainer.accelerator=cpu",  # exact resume is a CPU promise
]
# a small network and small tasks keep a meta-step near 0.1 s on a CPU
TINY = [
    "data.meta_batch_size=2", "data.k_query=2", "data.n_val_tasks=2", "data.eval_batch_size=2", "model.hidden=8",
    "data.num_workers=0", "data.persistent_workers=false",
]
# each algorithm with what makes its state worth resuming: learned step sizes (Meta-SGD, MAML++), per-step
# BatchNorm weights and running statistics and the MSL epoch (MAML++), a learning-rate schedule (ProtoNets),
# the inner Adam's moments and step count (Reptile). Learners whose state is only weights and Adam's, like MAML's
# on images (ANIL, FOMAML, the metric-based learners), are left out: each case costs three runs, and they are
# resumed through the same code (Meta-SGD's case holds MAML's state and more; MAML itself runs on sinusoids below).
ALGORITHMS = {
    "metasgd": [*TINY, "algo=metasgd"],
    "mamlpp": [*TINY, "algo=mamlpp", "algo.inner_steps=2", "algo.eval_inner_steps=2", "algo.msl_epochs=2", "algo.transductive=false"],
    "protonet": [*TINY, "algo=protonet", "algo.scheduler.step_size=3"],
    # Baseline++: the classifier over the training classes, BatchNorm running statistics, the stream of labelled images
    "baseline": [*TINY, "algo=baseline", "algo.head=cosine", "data.batch_size=4", "algo.fit_epochs=2", "model.track_running_stats=true"],
    "reptile": [*TINY, "algo=reptile", "algo.inner_steps=2", "algo.eval_inner_steps=1"],  # the persistent inner Adam state
    # SNAIL (#34): the support order of each training task drawn from (seed, step, task), so a resumed step reads the same sequences
    "snail": [*TINY, "algo=snail"],
    # regression through the task interface: MAML's vmap path on sinusoids, whose training tasks come from (seed, step)
    # (what a learner keeps beyond its weights and Adam's is resumed in the image cases above; the regression path adds
    # the task kind and the regression data module's stream)
    "maml_sinusoid": [*TINY, "data=sinusoid", "model.hidden=[8,8]", "algo=maml", "algo.inner_lr=0.01", "algo.eval_inner_steps=2"],
    # text (#31): MAML on a bag of WordLlama's frozen token embeddings, BANKING77's tokenized utterances (the real
    # data: tokenized into the session's cache once), training tasks from (seed, step) as for images
    "maml_text": [
        "data=banking77", "model.hidden=[8]", "algo=maml", "algo.inner_steps=1", "algo.eval_inner_steps=1", "data.meta_batch_size=2",
        "data.k_query=2", "data.n_val_tasks=2", "data.eval_batch_size=2", "data.pin_memory=false",
    ],
    # reinforcement learning: MAML-RL with TRPO on 2-D navigation, rollouts drawn from each task's seed
    "maml_rl": [
        "experiment=quick_navigation2d", "task_name=train", "data.horizon=10", "data.meta_batch_size=2", "data.rollouts=2", "data.eval_rollouts=2",
        "data.n_val_tasks=2", "model.hidden=[8,8]", "algo.eval_inner_steps=1", "callbacks.navigation_trajectories=null", "trainer.max_steps=40",
    ],
    # RL²: a GRU policy's weights and the Adam state of its PPO epochs, trials drawn from each task's seed
    "rl2": [
        "experiment=quick_navigation2d_rl2", "task_name=train", "data.horizon=10", "data.meta_batch_size=2", "data.rollouts=2", "data.eval_rollouts=2",
        "data.n_val_tasks=2", "model.hidden=8", "algo.epochs=2", "callbacks.navigation_trajectories=null",
    ],
    # GrBAL (#32): the episodes collected so far are the data module's state; killed after step KILL_AT["grbal"], in
    # epoch 1, whose episodes were planned through the model of step 4: a run that collected them again after resuming
    # would plan through other weights and end elsewhere (the collected episodes are compared too); an outer step of
    # 0.1 makes one meta-step change the plans (at Adam's 1e-3 the tiny planner's argmax rarely moves, and a resume
    # that dropped the episodes went unnoticed)
    "grbal": [
        "experiment=quick_grbal", "task_name=train", "model.hidden=[8]", "data.episode_length=10", "data.past=3", "data.future=2",
        "data.rollouts=2", "data.planner.candidates=6", "data.planner.horizon=2", "data.random_episodes=1", "data.val_episodes=1",
        "data.meta_batch_size=2", "data.n_val_tasks=2", "data.eval_batch_size=2", "trainer.max_steps=24", "algo.optimizer.lr=0.1",
    ],
}
# the step after which a killed run is stopped (2 unless said)
KILL_AT = {"grbal": 5}


def _max_steps(extra: list[str]) -> int:
    """The run's trainer.max_steps: MAX_STEPS unless its overrides set another."""
    given = [int(item.split("=")[1]) for item in extra if item.startswith("trainer.max_steps=")]
    return given[-1] if given else MAX_STEPS


def _command(log_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={log_dir}", *COMMON, *overrides]


def _env(data_dir: Path, cache_dir: Path) -> dict:
    # one thread per process: faster on a small shared machine, and the same reductions in every run; GPUs hidden
    return dict(os.environ, DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _step(path: Path) -> int:
    """global_step of a checkpoint that may be replaced while we read it (atomic writes make that safe)."""
    try:
        return load_checkpoint(path)["global_step"]
    except (CheckpointError, FileNotFoundError):
        return -1


def _last(log_dir: Path) -> list[Path]:
    return list(log_dir.glob("train/runs/*/checkpoints/last.ckpt"))


# the learners killed as real processes: the richest state of the images (MAML++), reinforcement learning and text
KILLED = ("mamlpp", "maml_rl", "maml_text", "grbal")
# where the others die (mid-epoch: data.batches_per_epoch=4)
STOP = 6


class Interrupted(Exception):
    """The end of a run that Interrupt stopped."""


class Interrupt(Callback):
    """Raises Interrupted after meta-step `step`: the run ends with what it saved until then, as a killed one.

    (Stopping with trainer.max_steps=step instead would change what reads max_steps, e.g. Reptile's annealing.)"""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted(f"after meta-step {trainer.global_step}")


def _final_state(compose_train, out: Path, *overrides: str) -> dict:
    """train() with COMMON and overrides into `out`: the learner's state_dict, with Reptile's inner Adam state."""
    cfg = compose_train(*COMMON, *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    _, objects = train(cfg)
    algorithm = objects["algorithm"]
    collected = getattr(objects["datamodule"], "buffer", None)  # GrBAL's episodes
    if collected is not None:
        episodes = {f"episodes.{part}.{i}": t for part, blocks in collected.state_dict().items() for i, t in enumerate(blocks)}
        return algorithm.state_dict() | episodes
    inner = getattr(algorithm, "inner_optimizer_state", None)
    if inner is None:
        return algorithm.state_dict()
    moments = {f"inner_state.{part}.{k}": v for part in ("m", "v") for k, v in getattr(inner, part).items()}
    return algorithm.state_dict() | moments | {"inner_state.step": torch.tensor(inner.step)}


def _assert_resumes_exactly(compose_train, tmp_path: Path, name: str, checkpoint: Path) -> None:
    """Resumed from `checkpoint`, the run of ALGORITHMS[name] ends with the uninterrupted run's state."""
    extra, stopped_at = ALGORITHMS[name], _step(checkpoint)
    assert KILL_AT.get(name, 2) <= stopped_at < _max_steps(extra), name
    expected = _final_state(compose_train, tmp_path / f"{name}-reference", *extra)
    got = _final_state(compose_train, tmp_path / f"{name}-resumed", *extra, f"ckpt_path={checkpoint}")
    assert load_checkpoint(tmp_path / f"{name}-resumed" / "checkpoints" / "last.ckpt")["global_step"] == _max_steps(extra)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), f"{name}: {key} differs after resuming from step {stopped_at}"


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, cache_dir, compose_train, one_thread):
    jobs = {
        name: subprocess.Popen(_command(tmp_path / name, *ALGORITHMS[name]), cwd=tmp_path, env=_env(data_dir, cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name in KILLED
    }
    running, deadline = set(jobs), time.monotonic() + 300
    while running and time.monotonic() < deadline:
        for name in list(running):
            if jobs[name].poll() is not None or any(_step(path) >= KILL_AT.get(name, 2) for path in _last(tmp_path / name)):
                jobs[name].send_signal(signal.SIGKILL)  # no handler runs: whatever was on disk is all there is
                running.discard(name)
        time.sleep(0.02)
    for name, job in jobs.items():
        _, error = job.communicate(timeout=60)
        assert job.returncode == -signal.SIGKILL, f"{name}: the run ended before it could be killed ({job.returncode}): {error[-2000:]}"
    for name in KILLED:
        (killed,) = _last(tmp_path / name)
        _assert_resumes_exactly(compose_train, tmp_path, name, killed)


@pytest.mark.parametrize("name", [name for name in ALGORITHMS if name not in KILLED])
def test_a_run_interrupted_mid_epoch_resumes_exactly(tmp_path, compose_train, one_thread, name):
    with pytest.raises(Interrupted):
        _final_state(compose_train, tmp_path / f"{name}-interrupted", *ALGORITHMS[name], "+callbacks.interrupt._target_=test_resume.Interrupt", f"+callbacks.interrupt.step={STOP}")
    _assert_resumes_exactly(compose_train, tmp_path, name, tmp_path / f"{name}-interrupted" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("content, expected", [(None, "does not exist"), (b"PK\x03\x04trunc", "cannot be read"), ("foreign", "not written by a metalight run")])
def test_bad_checkpoint_fails_before_training_naming_the_file(compose_train, tmp_path, content, expected):
    path = tmp_path / "given.ckpt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as raised:
        train(compose_train(f"ckpt_path={path}"))
    assert str(path) in str(raised.value)


def test_ckpt_path_last_without_runs_says_what_to_pass(compose_train):
    with pytest.raises(CheckpointError, match="ckpt_path=last"):
        train(compose_train("ckpt_path=last"))
