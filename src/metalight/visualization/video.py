"""HalfCheetah as short videos (eval.py video.tasks=N): the test's own episodes, before and after adaptation.

Two kinds of run have them. A meta-RL run (data=halfcheetah_dir, halfcheetah_vel, halfcheetah_cripple,
halfcheetah_rand_params: MAML-RL and its baselines): an episode of each of the first video.tasks test tasks before
adaptation and after k inner steps (video.steps), task<i>_step<k>.gif. During `trainer.test` a callback
(TestEpisodes) hands the learner a TaskEnvironment whose vector environments keep, for those tasks, the MuJoCo
states (time, qpos, qvel) of their first rollout after reset and after every step, and every rollout's rewards. So
each video shows an episode the test scored, adapted and sampled exactly as the test adapted and sampled it
(the same batches, the same noise), and its return is the one that entered test/return_step{k}.

A GrBAL run (data=dynamics: a dynamics model and its MPC controller, tasks/dynamics.py): the first video.tasks
held-out test bodies, each driven once by the controller without adaptation (body<i>_unadapted.gif, video.steps
0) and once adapted online (body<i>_adapted.gif, video.steps 1): the very episodes ControllerEvaluation scores
(same bodies, starts and planner noise), recorded by ControllerEpisodes, which wraps the data module's make_env
while ControllerEvaluation's test runs; their returns are those test/return and test/return_unadapted average.

After the test, the states are replayed into a mujoco.Renderer on the environment's own model, through the model's
`track` camera (it follows the cheetah's centre of mass), a crippled limb coloured red (bodies.HalfCheetahCripple
.geom_colours), and written as GIFs with Pillow (a core dependency): every video.every-th state (the start state
and one per step: horizon + 1 frames at every=1), video.fps frames per second (20 = real time at
data.env_options.frame_skip 5, a step of 5 x 0.01 s; at the GrBAL and Finn et al. protocols' frame_skip 1, 5x
slowed, or real time with video.every=5).

MuJoCo opens an OpenGL context to render: on a machine without a display set MUJOCO_GL=egl (or osmesa)
before it starts; eval.py opens one renderer before the test and stops with one line when it cannot.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from metalight.errors import ConfigError
from metalight.runs.checkpoint_io import write_atomically

log = logging.getLogger(__name__)

VIDEO_ENVS = ("halfcheetah_dir", "halfcheetah_vel", "halfcheetah_cripple", "halfcheetah_rand_params")  # HalfCheetahTasks, all
DYNAMICS = "metalight.tasks.dynamics.DynamicsDataModule"  # data=dynamics: the controller's episodes (ControllerEpisodes)
EPISODES = ("unadapted", "adapted")  # a GrBAL run's video.steps 0 and 1: ControllerEvaluation's episodes of a body
CAMERA = "track"  # HalfCheetah-v5's camera that follows the centre of mass from the side
MAX_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """eval.py's `video` node, checked: the first `tasks` test tasks, after each of `steps` inner steps (0: before adaptation), as GIFs.

    controller: a GrBAL run (data=dynamics), whose tasks are held-out bodies and whose steps are 0 (the controller
    without adaptation) and 1 (adapted online); every: render every n-th state of an episode.
    """

    tasks: int
    steps: tuple[int, ...]
    fps: float
    width: int
    height: int
    controller: bool = False
    every: int = 1


def _whole(name: str, value: Any, smallest: int, largest: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest or (largest is not None and value > largest):
        upper = f" and <= {largest}" if largest is not None else ""
        raise ConfigError(f"video.{name}={value!r} is not valid: use a whole number >= {smallest}{upper}.")
    return value


def video_options(node: Mapping | None, run_cfg: Any) -> VideoOptions | None:
    """eval.py's `video` node checked against the run's config, None when video.tasks is 0 (off); ConfigError (one line) for another data set or a bad value."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    env = OmegaConf.select(run_cfg, "data.env", default=None)
    controller = OmegaConf.select(run_cfg, "data._target_", default=None) == DYNAMICS
    tasks = _whole("tasks", node.get("tasks", 0), 0)
    if tasks == 0:
        return None
    if env not in VIDEO_ENVS:
        what = f"data.env={env}" if env else "data that is not reinforcement learning"
        raise ConfigError(f"video.tasks={tasks} renders HalfCheetah runs (data.env={', '.join(VIDEO_ENVS)}); this run has {what}: drop video.tasks.")
    if controller:
        count, what = OmegaConf.select(run_cfg, "data.test_episodes", default=None), "held-out test bodies: use at most data.test_episodes"
    else:
        count, what = OmegaConf.select(run_cfg, "data.n_test_tasks", default=None), "test tasks: use at most data.n_test_tasks"
    if count is not None and tasks > count:
        raise ConfigError(f"video.tasks={tasks} is more than the run's {count} {what}.")
    steps = node.get("steps", [0, 1])
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ConfigError(f"video.steps={steps!r} is not valid: give a list of inner steps, e.g. video.steps=[0,1] (0: before adaptation).")
    steps = tuple(sorted({_whole("steps", s, 0) for s in steps}))
    if controller:
        steps = _controller_steps(steps, OmegaConf.select(run_cfg, "data.adapt_online", default=True))
    else:
        eval_steps = OmegaConf.select(run_cfg, "algo.eval_inner_steps", default=None)
        if isinstance(eval_steps, int) and steps[-1] > eval_steps:
            raise ConfigError(f"video.steps={list(steps)}: the test adapts {eval_steps} steps (algo.eval_inner_steps={eval_steps}): use steps in 0..{eval_steps}.")
    fps = node.get("fps", 20)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 100:
        raise ConfigError(f"video.fps={fps!r} is not valid: use a number in (0, 100] (20 = real time at frame_skip 5).")
    width, height = _whole("width", node.get("width", 320), 16, MAX_SIZE), _whole("height", node.get("height", 240), 16, MAX_SIZE)
    every = _whole("every", node.get("every", 1), 1)
    return VideoOptions(tasks, steps, float(fps), width, height, controller, every)


def _controller_steps(steps: tuple[int, ...], adapt_online: bool) -> tuple[int, ...]:
    """A GrBAL run's video.steps: 0 (without adaptation) and 1 (adapted online) only; a run that never adapts (MB-MPC) has only 0."""
    if steps[-1] > 1:
        raise ConfigError(
            f"video.steps={list(steps)}: a GrBAL run's test drives each held-out body twice, 0 = without adaptation and "
            "1 = adapted online at every step: use video.steps=[0,1], [0] or [1]."
        )
    if not adapt_online:
        if steps == (1,):
            raise ConfigError("video.steps=[1]: this run never adapts (data.adapt_online=false, MB-MPC): its test has only episodes without adaptation, video.steps=[0].")
        if 1 in steps:
            log.info("video: data.adapt_online=false (MB-MPC): the test runs no adapted episode, only body<i>_unadapted.gif is written")
        steps = (0,)
    return steps


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def open_renderer(model: Any, width: int, height: int, tasks: int) -> Any:
    """A mujoco.Renderer of width x height on (a copy of) `model`; ConfigError in one line when MuJoCo cannot open an OpenGL context.

    MuJoCo picks its OpenGL back end when it is imported, from MUJOCO_GL (glfw when unset, which needs a
    display); a failure surfaces deep inside it (a FatalError, or an AttributeError from PyOpenGL).
    """
    backend = os.environ.get("MUJOCO_GL") or "glfw (MUJOCO_GL unset)"
    # a renderer whose context failed complains again when collected (Renderer.__del__), and glfw warns: keep
    # the error to the one line below
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    failure = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import mujoco

                model = copy.copy(model)
                model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
                model.vis.global_.offheight = max(model.vis.global_.offheight, height)
                # the shadow map (4096 x 4096 in HalfCheetah's model) costs most of a frame in software OpenGL (Mesa's EGL on a
                # CPU: 0.06 s a frame at 320 x 240, 0.03 s at 1024): twice the frame's size is as sharp at this size
                model.vis.quality.shadowsize = min(model.vis.quality.shadowsize, max(1024, 2 * max(width, height)))
                return mujoco.Renderer(model, height=height, width=width)
            except Exception as error:  # noqa: BLE001 - whatever the OpenGL back end raises
                failure = _first_line(error)
    finally:
        import gc

        gc.collect()
        sys.unraisablehook = hook
    raise ConfigError(
        f"video.tasks={tasks} renders with MuJoCo, which could not open an OpenGL context with MUJOCO_GL={backend} ({failure}): "
        "without a display run with MUJOCO_GL=egl (EGL: a GPU driver, or Mesa's libegl1 libegl-mesa0 libgl1-mesa-dri) or "
        "MUJOCO_GL=osmesa (libosmesa6), or set video.tasks=0."
    )


def check_rendering(options: VideoOptions, env: str) -> None:
    """Open and close one renderer of the requested size on HalfCheetah-v5's model, before anything runs or is written."""
    try:
        import mujoco  # noqa: F401
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    except ImportError as error:
        raise ConfigError(f"data.env={env} needs the `rl` extra ({error.name} is not installed): pip install -e '.[rl]' (make install installs it).") from None
    except Exception as error:  # noqa: BLE001 - e.g. MUJOCO_GL=osmesa without libosmesa fails while importing mujoco
        backend = os.environ.get("MUJOCO_GL") or "glfw (MUJOCO_GL unset)"
        raise ConfigError(
            f"video.tasks={options.tasks}: MuJoCo does not load with MUJOCO_GL={backend} ({_first_line(error)}): "
            "install that back end (MUJOCO_GL=osmesa: libosmesa6; egl: libegl1 libegl-mesa0 libgl1-mesa-dri) or use MUJOCO_GL=egl."
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HalfCheetahEnv().model
    open_renderer(model, options.width, options.height, options.tasks).close()


class _RecordingEnv:
    """A vector environment that keeps the states of some of its copies after reset and every step, every copy's rewards, and the tasks it was reset to."""

    def __init__(self, env: Any, rows: list[int]) -> None:
        self.env, self.rows = env, rows
        self.states: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.tasks: np.ndarray | None = None

    def reset(self, **kwargs: Any) -> Any:
        out = self.env.reset(**kwargs)
        tasks = (kwargs.get("options") or {}).get("tasks")
        if tasks is not None:
            self.tasks = tasks.detach().cpu().double().numpy() if hasattr(tasks, "detach") else np.asarray(tasks, dtype=float)
        self.states, self.rewards = [self.env.states[self.rows].copy()], []
        return out

    def step(self, actions: Any) -> Any:
        out = self.env.step(actions)
        self.states.append(self.env.states[self.rows].copy())
        self.rewards.append(out[1].detach().cpu().double().numpy())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class TestEpisodes(Callback):
    """While the test runs, keep the first rollout of its first `n_tasks` tasks after every evaluation step: episodes[(task, step)].

    Each is {"task": the task's parameters, "states": [horizon + 1, state size] (MuJoCo's full physics state),
    "return": that episode's return, "task_return": the task's average return over its rollouts (what the test
    averaged)}. model and state_spec are the environment's, to replay the states. One process only.
    """

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.episodes: dict[tuple[int, int], dict[str, Any]] = {}
        self.model: Any = None
        self.state_spec: Any = None
        self._environment: Any = None
        self._made: list[_RecordingEnv] = []
        self._first = 0  # test index of the current batch's first task

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand the learner an environment that records."""
        environment = pl_module.environment
        self._environment, self._first, self.episodes = environment, 0, {}

        def make(num_envs: int) -> Any:
            env = environment.make(num_envs)
            rollouts = environment.eval_rollouts
            rows = [b * rollouts for b in range(num_envs // rollouts) if self._first + b < self.n_tasks]
            if not rows:
                return env
            self.model, self.state_spec = env.model, env.state_spec
            recording = _RecordingEnv(env, rows)
            self._made.append(recording)
            return recording

        pl_module.environment = dataclasses.replace(environment, make=make)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the batch's recorded episodes: one vector environment per evaluation step, in order (before adaptation, after step 1, ...)."""
        tasks = batch["tasks"].detach().cpu().double().numpy()
        rollouts = self._environment.eval_rollouts
        for step, env in enumerate(self._made):
            rewards = np.stack(env.rewards, 1).reshape(len(tasks), rollouts, -1)  # HalfCheetah's episodes never end early
            for j, row in enumerate(env.rows):
                b = row // rollouts
                self.episodes[(self._first + b, step)] = {
                    "task": tasks[b].tolist(),
                    "states": np.stack([s[j] for s in env.states]),
                    "return": float(rewards[b, 0].sum()),
                    "task_return": float(rewards[b].sum(-1).mean()),
                    "colours": body_colours(env.env, tasks[b]),
                }
        self._made = []
        self._first += len(tasks)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the learner its environment back."""
        if self._environment is not None:
            pl_module.environment, self._environment = self._environment, None


class ControllerEpisodes(Callback):
    """A GrBAL run's test episodes of its first `n_bodies` held-out bodies, without and with online adaptation: episodes[(body, step)].

    ControllerEvaluation runs them in on_test_epoch_end through datamodule.episodes, each set of bodies in one vector
    environment of datamodule.make_env: adapted (when data.adapt_online), unadapted, random, in that order. Placed
    just before it (attach_recorder), this callback wraps make_env for that hook only, then names the environments
    in that order: step 0 the unadapted episodes, 1 the adapted ones (the random policy's are not kept). Each episode
    is {"task": the body's parameters, "states": [episode_length + 1, state size], "return": that episode's return
    (one of those test/return and test/return_unadapted average), "colours": the body's geom colours or None}.
    """

    def __init__(self, n_bodies: int) -> None:
        self.n_bodies = n_bodies
        self.episodes: dict[tuple[int, int], dict[str, Any]] = {}
        self.model: Any = None
        self.state_spec: Any = None
        self._datamodule: Any = None
        self._made: list[_RecordingEnv] = []

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record every environment the callbacks after this one make in their on_test_epoch_end (ControllerEvaluation's episodes)."""
        datamodule, made = trainer.datamodule, []

        def make_env(count: int) -> Any:
            env = type(datamodule).make_env(datamodule, count)
            self.model, self.state_spec = env.model, env.state_spec
            made.append(_RecordingEnv(env, list(range(min(self.n_bodies, count)))))
            return made[-1]

        datamodule.make_env = make_env  # an instance attribute: the class's method again once deleted
        self._datamodule, self._made, self.episodes = datamodule, made, {}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the data module its make_env back; keep the unadapted (step 0) and adapted (step 1) episodes."""
        if self._datamodule is None:
            return
        datamodule, made = self._datamodule, self._made
        del datamodule.make_env
        self._datamodule, self._made = None, []
        names = ("adapted", "unadapted", "random") if datamodule.adapt_online else ("unadapted", "random")
        if len(made) != len(names):
            raise RuntimeError(f"the test ran {len(made)} sets of held-out episodes, not ControllerEvaluation's {', '.join(names)}: update ControllerEpisodes")
        for env, name in zip(made, names):
            if name not in EPISODES:
                continue
            rewards = np.stack(env.rewards, 1)  # [bodies, steps]
            for j, row in enumerate(env.rows):
                self.episodes[(row, EPISODES.index(name))] = {
                    "task": env.tasks[row].tolist(),
                    "states": np.stack([s[j] for s in env.states]),
                    "return": float(rewards[row].sum()),
                    "colours": body_colours(env.env, env.tasks[row]),
                }


def attach_recorder(trainer: Trainer, options: VideoOptions) -> TestEpisodes | ControllerEpisodes:
    """The callback that records the test's episodes for `options`, in its place among the trainer's callbacks."""
    if not options.controller:
        recorder: TestEpisodes | ControllerEpisodes = TestEpisodes(options.tasks)
        trainer.callbacks.append(recorder)
        return recorder
    from metalight.tasks.controller_evaluation import ControllerEvaluation

    place = next((i for i, callback in enumerate(trainer.callbacks) if isinstance(callback, ControllerEvaluation)), None)
    if place is None:
        raise ConfigError(f"video.tasks={options.tasks} renders the episodes ControllerEvaluation scores, and this run has none: restore callbacks.controller_evaluation (conf/data/dynamics.yaml).")
    recorder = ControllerEpisodes(options.tasks)
    trainer.callbacks.insert(place, recorder)  # its on_test_epoch_end runs just before ControllerEvaluation's
    return recorder


def body_colours(env: Any, task: np.ndarray) -> np.ndarray | None:
    """The geom colours [ngeom, 4] that show the body of `task` (halfcheetah_cripple: the crippled limb red), None for a body that looks as usual."""
    paint = getattr(env, "geom_colours", None)
    return None if paint is None else paint(env.model, env.model.geom_rgba, int(round(float(task[0]))))


def render_states(renderer: Any, state_spec: Any, states: np.ndarray, colours: np.ndarray | None = None) -> list[np.ndarray]:
    """One RGB frame [height, width, 3] per MuJoCo state, seen from the model's tracking camera, with the geoms in `colours` when given."""
    import mujoco

    if colours is not None:
        renderer.model.geom_rgba[:] = colours
    data = mujoco.MjData(renderer.model)
    frames = []
    for state in states:
        mujoco.mj_setState(renderer.model, data, state, state_spec)
        mujoco.mj_forward(renderer.model, data)
        renderer.update_scene(data, camera=CAMERA)
        frames.append(renderer.render())
    return frames


def write_gif(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """frames as an endless GIF of `fps` frames per second (GIF counts in hundredths of a second), written atomically."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0))


def task_label(env: str, task: list[float]) -> str:
    """A task in words: its direction, target velocity or crippled joint."""
    from metalight.envs.bodies import JOINTS

    if env == "halfcheetah_dir":
        return f"direction {task[0]:+.0f}"
    if env == "halfcheetah_vel":
        return f"target velocity {task[0]:.2f}"
    if env == "halfcheetah_cripple":
        return f"crippled joint {JOINTS[round(task[0])]}"
    return "a body of randomized masses, inertias, damping and friction"


def video_name(options: VideoOptions, task: int, step: int) -> tuple[str, dict[str, Any], str]:
    """A video's file stem, its fields in the results JSON, and its episode in words."""
    if options.controller:
        return f"body{task}_{EPISODES[step]}", {"body": task, "episode": EPISODES[step]}, "adapted online" if step else "without adaptation"
    steps = "before adaptation" if step == 0 else f"after {step} inner step{'s' if step > 1 else ''}"
    return f"task{task}_step{step}", {"task": task, "step": step}, steps


def write_videos(recorder: TestEpisodes | ControllerEpisodes, options: VideoOptions, folder: Path, env: str) -> list[dict[str, Any]]:
    """Render every recorded (task, step) of options into folder/task<i>_step<k>.gif (a GrBAL run: body<i>_unadapted.gif, body<i>_adapted.gif); what was written, one dict per video."""
    missing = [(i, k) for i in range(options.tasks) for k in options.steps if (i, k) not in recorder.episodes]
    if missing:
        raise RuntimeError(f"the test recorded no episode of (task, step) {missing[:3]}: were its batches split over processes?")
    renderer = open_renderer(recorder.model, options.width, options.height, options.tasks)
    intact = renderer.model.geom_rgba.copy()
    written = []
    try:
        for i in range(options.tasks):
            for k in options.steps:
                episode = recorder.episodes[(i, k)]
                stem, fields, episode_words = video_name(options, i, k)
                path = folder / f"{stem}.gif"
                colours = episode["colours"] if episode["colours"] is not None else intact
                frames = render_states(renderer, recorder.state_spec, episode["states"][:: options.every], colours)
                write_gif(path, frames, options.fps)
                returns = {key: episode[key] for key in ("return", "task_return") if key in episode}
                written.append({"path": str(path), **fields, "task_parameters": episode["task"], **returns, "frames": len(frames)})
                average = f" (the task's average {episode['task_return']:.2f})" if "task_return" in episode else ""
                what = f"held-out body {i}" if options.controller else f"test task {i}"
                log.info("video %s: %s (%s), %s, this episode's return %.2f%s", path, what, task_label(env, episode["task"]), episode_words, episode["return"], average)
    finally:
        renderer.close()
    return written
