"""eval.py video.tasks=N on a HalfCheetah run: GIFs of the test's own episodes before and after adaptation (a MAML-RL run's
tasks after k inner steps, a GrBAL run's held-out bodies without and with online adaptation); one line for what it cannot do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("gymnasium", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
mujoco = pytest.importorskip("mujoco", reason="the `rl` extra (pip install -e '.[rl]') is not installed")

from metalight.apply.evaluation import evaluate  # noqa: E402
from metalight.runs import cli  # noqa: E402
from metalight.runs.training import train  # noqa: E402

# 1 meta-step of a 8-unit policy; 3 test tasks in batches of 2 (the videos' tasks span two test batches), 2 rollouts
# of 6 steps each, adapted 1 step at test; the protocol's frame_skip 1, with the root's velocity (convention=gymnasium)
# so that an episode's return is its distance run, less the control cost
OPTIONS = {"frame_skip": 1, "convention": "gymnasium"}
TINY = [
    "experiment=halfcheetah_dir", "trainer.max_steps=1", "data.meta_batch_size=2", "data.rollouts=1", "data.eval_rollouts=2",
    "data.horizon=6", "data.n_val_tasks=1", "data.n_test_tasks=3", "data.eval_batch_size=2", "data.batches_per_epoch=1",
    "algo.eval_inner_steps=1", "model.hidden=[8]", "logger=csv", "test=false", *(f"data.env_options.{k}={v}" for k, v in OPTIONS.items()),
]


@pytest.fixture
def egl(monkeypatch):
    """MuJoCo renders through EGL in this process, whatever MUJOCO_GL it was imported with; skips when EGL cannot render here."""
    monkeypatch.setenv("PYOPENGL_PLATFORM", "egl")  # what `import mujoco.egl` sets; undone after the test
    try:
        from mujoco.egl import GLContext

        context = GLContext(16, 16)
        context.make_current()
        context.free()
    except Exception as error:  # noqa: BLE001 - no EGL library, no device, another PyOpenGL platform already loaded
        pytest.skip(f"EGL rendering is not available here ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})")
    monkeypatch.setattr(mujoco.gl_context, "GLContext", GLContext)


def save_run_config(cfg, run: Path) -> None:
    """What train.py's Hydra leaves in a run folder: the composed config, which eval.py restores."""
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")


@pytest.fixture
def cheetah_checkpoint(compose_generated, tmp_path) -> Path:
    """last.ckpt of a 1-step halfcheetah_dir run (TINY), in its run folder."""
    cfg = compose_generated(*TINY)
    save_run_config(cfg, tmp_path / "run")
    train(cfg)
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def eval_config(compose_generated, checkpoint: Path, *overrides: str):
    return compose_generated(f"ckpt_path={checkpoint}", *overrides, config_name="eval", folder="eval")


def read_gif(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


def test_videos_show_the_tests_own_episodes_before_and_after_adaptation(egl, cheetah_checkpoint, compose_generated, monkeypatch) -> None:
    """video.tasks=3 video.steps=[0,1]: 6 GIFs of horizon + 1 frames of the asked size; the same start state before and after the step,
    different motion; each video's task average is the test's return of that task (their mean is test/return_step{k}); its states are
    those of the task's first rollout (its start state is that copy's), and its return that episode's (the distance it ran, less at most
    the control cost)."""
    from metalight.visualization import video
    from metalight.algorithms.rl.policy_gradient import start_seeds
    from metalight.envs.halfcheetah import HalfCheetahDirection
    from metalight.tasks.rl import RLDataModule

    recorders = []

    class KeptEpisodes(video.TestEpisodes):
        def __init__(self, n_tasks: int) -> None:
            super().__init__(n_tasks)
            recorders.append(self)

    monkeypatch.setattr(video, "TestEpisodes", KeptEpisodes)
    results = evaluate(eval_config(compose_generated, cheetah_checkpoint, "video.tasks=3", "video.steps=[0,1]", "video.width=64", "video.height=48"))
    folder = cheetah_checkpoint.parents[1] / "videos" / "last"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"task{i}_step{k}.gif" for i in range(3) for k in (0, 1))
    assert [Path(v["path"]) for v in results["videos"]] == [folder / f"task{i}_step{k}.gif" for i in range(3) for k in (0, 1)]
    frames = {(v["task"], v["step"]): read_gif(Path(v["path"])) for v in results["videos"]}
    for video in frames.values():
        assert len(video) == 6 + 1 and all(frame.shape == (48, 64, 3) for frame in video)
        assert any(not np.array_equal(video[0], frame) for frame in video[1:]), "the cheetah moves"
    for i in range(3):
        before, after = frames[(i, 0)], frames[(i, 1)]
        assert np.array_equal(before[0], after[0]), "both episodes start from the task's start state"
        assert not np.array_equal(before[-1], after[-1]), "the adapted policy's episode is another one"
    for k in (0, 1):
        videos = [v for v in results["videos"] if v["step"] == k]
        assert np.mean([v["task_return"] for v in videos]) == pytest.approx(results["return_steps"][k], rel=1e-5, abs=1e-5)
        assert all(v["frames"] == 7 and v["task_parameters"][0] in (-1.0, 1.0) for v in videos)
    assert any(v["return"] != pytest.approx(v["task_return"]) for v in results["videos"]), "the shown episode is rollout 0 of 2, not their mean"
    # the states: task i is task i % 2 of its test batch of 2 tasks x 2 rollouts; its first rollout is copy 2 * (i % 2),
    # started from that copy's seed (start_seeds of the batch's task seeds)
    episodes = recorders[0].episodes
    test_data = RLDataModule(env="halfcheetah_dir", horizon=6, rollouts=1, eval_rollouts=2, eval_batch_size=2, n_test_tasks=3)
    test_data.setup()
    test_batches = list(test_data.test_dataloader())
    for i in range(3):
        batch = test_batches[i // 2]
        assert torch.equal(batch["tasks"][i % 2], torch.tensor(episodes[(i, 0)]["task"], dtype=batch["tasks"].dtype))
        env = HalfCheetahDirection(2 * len(batch["tasks"]), horizon=6, **OPTIONS)
        env.reset(seed=start_seeds(batch["seeds"], 2), options={"tasks": batch["tasks"].repeat_interleave(2, dim=0)})
        for k in (0, 1):
            episode = episodes[(i, k)]
            assert np.array_equal(episode["states"][0], env.states[2 * (i % 2)]) and not np.array_equal(episode["states"][0], env.states[1])
            ran = episode["task"][0] * (episode["states"][-1][1] - episode["states"][0][1]) / env.dt  # direction x distance / dt: the velocity rewards' sum
            assert ran - 0.05 * 6 * 6 - 1e-4 <= episode["return"] <= ran + 1e-4, (ran, episode["return"])
    assert cheetah_checkpoint.with_name("last.test.json").is_file()


# GrBAL in seconds: 1 iteration of 1 random episode of 8 steps, a 8-unit model, 6 candidates x 2 steps; 2 held-out bodies
GRBAL = [
    "experiment=grbal_halfcheetah_cripple", "trainer.max_epochs=1", "data.batches_per_epoch=1", "data.meta_batch_size=2", "data.rollouts=1",
    "data.episode_length=8", "data.past=3", "data.future=2", "data.planner.candidates=6", "data.planner.horizon=2",
    "data.random_episodes=1", "data.val_episodes=1", "data.test_episodes=2", "data.n_val_tasks=2", "data.n_test_tasks=2",
    "data.eval_batch_size=2", "model.hidden=[8]", "logger=csv", "test=false",
]


def is_red(frame: np.ndarray) -> np.ndarray:
    """The pixels of the crippled limb's red (RED = (1, 0, 0), lit): [height, width]."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    return (r > 100) & (r > 3 * g) & (r > 3 * b)


def test_grbal_videos_are_the_held_out_bodies_controller_evaluation_scored(egl, compose_generated, tmp_path, monkeypatch) -> None:
    """A GrBAL run, video.tasks=2: body<i>_unadapted.gif and body<i>_adapted.gif of episode_length + 1 frames, the crippled limb red,
    both episodes of a body from the same start, different with adaptation; their returns are the ones ControllerEvaluation averaged
    (the mean over the 2 bodies is test/return adapted, test/return_unadapted without), so the order of its episodes is the one
    named; video.every=5 keeps states 0 and 5; the data module gets its make_env back."""
    from metalight.visualization import video

    recorders = []

    class KeptEpisodes(video.ControllerEpisodes):
        def __init__(self, n_bodies: int) -> None:
            super().__init__(n_bodies)
            recorders.append(self)

        def on_test_end(self, trainer, pl_module) -> None:
            super().on_test_end(trainer, pl_module)
            self.datamodule = trainer.datamodule

    monkeypatch.setattr(video, "ControllerEpisodes", KeptEpisodes)
    cfg = compose_generated(*GRBAL)
    save_run_config(cfg, tmp_path / "run")
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # a large online step, so that adaptation visibly changes the tiny model's plans
    results = evaluate(eval_config(compose_generated, checkpoint, "video.tasks=2", "video.width=96", "video.height=72", "algo.inner_lr=0.5"))
    folder = checkpoint.parents[1] / "videos" / "last"
    names = [f"body{i}_{name}.gif" for i in range(2) for name in ("unadapted", "adapted")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert [Path(v["path"]).name for v in results["videos"]] == names
    assert [(v["body"], v["episode"]) for v in results["videos"]] == [(i, name) for i in range(2) for name in ("unadapted", "adapted")]
    frames = {(v["body"], v["episode"]): read_gif(Path(v["path"])) for v in results["videos"]}
    for clip in frames.values():
        assert len(clip) == 8 + 1 and all(frame.shape == (72, 96, 3) for frame in clip)
        assert all(is_red(frame).sum() >= 4 for frame in clip), "the crippled limb is red"
    for i in range(2):
        assert np.array_equal(frames[(i, "unadapted")][0], frames[(i, "adapted")][0]), "both episodes start from the body's start"
        assert not np.array_equal(frames[(i, "unadapted")][-1], frames[(i, "adapted")][-1]), "adaptation changes the plans"
    assert all(v["task_parameters"] == [0.0] and v["frames"] == 9 for v in results["videos"]), "the held-out joint, bthigh"
    for name, key in (("adapted", "return"), ("unadapted", "return_unadapted")):
        shown = [v["return"] for v in results["videos"] if v["episode"] == name]
        assert np.mean(shown) == pytest.approx(results[key], rel=1e-5, abs=1e-5), name
    assert results["return"] != pytest.approx(results["return_unadapted"])
    recorder = recorders[0]
    assert "make_env" not in vars(recorder.datamodule)
    fewer = video.write_videos(recorder, dataclasses.replace(video.video_options({"tasks": 1, "steps": [1], "width": 96, "height": 72, "every": 5},
                               OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}))), tmp_path / "fewer", "halfcheetah_cripple")
    assert [v["frames"] for v in fewer] == [2]
    for frame, kept in zip(read_gif(Path(fewer[0]["path"])), [0, 5], strict=True):
        assert np.array_equal(frame, frames[(0, "adapted")][kept])


def assert_eval_stops_with_one_line(cfg, caplog, checkpoint: Path, expected: str) -> None:
    """eval.py's entry point ends with one logged error line holding `expected`, exit status 2, and nothing new in the run folder or the eval folder."""
    run = checkpoint.parents[1]
    before = {p for p in run.rglob("*") if p.is_file()}
    caplog.clear()
    with pytest.raises(SystemExit) as stopped:
        cli.run_reporting_errors(evaluate, cfg)
    assert stopped.value.code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], errors
    assert {p for p in run.rglob("*") if p.is_file()} == before
    eval_run = Path(cfg.hydra.runtime.output_dir)
    assert not [p for p in eval_run.rglob("*") if p.is_file() and ".hydra" not in p.parts]


def fake_run(compose_generated, tmp_path: Path, *overrides: str) -> Path:
    """A run folder with the composed config of `overrides` and a checkpoint holding no weights: enough for eval.py's checks before it builds."""
    cfg = compose_generated(*overrides, folder="fake")
    run = tmp_path / "fake_run"
    save_run_config(cfg, run)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": {}}, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "run, expected",
    [
        (
            ["experiment=quick_navigation2d"],
            "video.tasks=1 renders HalfCheetah runs (data.env=halfcheetah_dir, halfcheetah_vel, halfcheetah_cripple, halfcheetah_rand_params); "
            "this run has data.env=navigation2d",
        ),
        (["data=omniglot", "algo=protonet"], "this run has data that is not reinforcement learning"),
        (["data=sinusoid", "algo=maml"], "this run has data that is not reinforcement learning"),
    ],
)
def test_video_of_another_data_set_is_one_line(compose_generated, tmp_path, caplog, run, expected) -> None:
    checkpoint = fake_run(compose_generated, tmp_path, *run)
    assert_eval_stops_with_one_line(eval_config(compose_generated, checkpoint, "video.tasks=1"), caplog, checkpoint, expected)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["video.tasks=4"], "video.tasks=4 is more than the run's 3 test tasks"),
        (["video.tasks=-1"], "video.tasks=-1 is not valid"),
        (["video.tasks=1", "video.steps=[0,2]"], "video.steps=[0, 2]: the test adapts 1 steps (algo.eval_inner_steps=1)"),
        (["video.tasks=1", "video.width=8"], "video.width=8 is not valid"),
        (["video.tasks=1", "video.fps=0"], "video.fps=0 is not valid"),
    ],
)
def test_bad_video_options_are_one_line(compose_generated, tmp_path, caplog, overrides, expected) -> None:
    checkpoint = fake_run(compose_generated, tmp_path, *TINY)
    assert_eval_stops_with_one_line(eval_config(compose_generated, checkpoint, *overrides), caplog, checkpoint, expected)


@pytest.mark.parametrize(
    "run, overrides, expected",
    [
        (GRBAL, ["video.tasks=3"], "video.tasks=3 is more than the run's 2 held-out test bodies: use at most data.test_episodes"),
        (GRBAL, ["video.tasks=1", "video.steps=[0,2]"], "video.steps=[0, 2]: a GrBAL run's test drives each held-out body twice"),
        (GRBAL, ["video.tasks=1", "video.every=0"], "video.every=0 is not valid"),
        (["experiment=mb_mpc_halfcheetah_cripple", *GRBAL[1:]], ["video.tasks=1", "video.steps=[1]"], "this run never adapts (data.adapt_online=false, MB-MPC)"),
    ],
)
def test_bad_grbal_video_options_are_one_line(compose_generated, tmp_path, caplog, run, overrides, expected) -> None:
    checkpoint = fake_run(compose_generated, tmp_path, *run)
    assert_eval_stops_with_one_line(eval_config(compose_generated, checkpoint, *overrides), caplog, checkpoint, expected)


def test_an_mb_mpc_run_has_only_its_unadapted_episodes() -> None:
    """MB-MPC (data.adapt_online=false) never adapts: the default video.steps=[0,1] renders step 0 alone."""
    from metalight.visualization.video import video_options

    run = OmegaConf.create({"data": {"_target_": "metalight.tasks.dynamics.DynamicsDataModule", "env": "halfcheetah_cripple", "test_episodes": 20, "adapt_online": False}})
    options = video_options({"tasks": 2}, run)
    assert options.controller and options.steps == (0,)
    run.data.adapt_online = True
    assert video_options({"tasks": 2}, run).steps == (0, 1)


def test_no_opengl_is_one_line_naming_mujoco_gl_before_the_test(compose_generated, tmp_path, caplog, monkeypatch) -> None:
    """As on a machine without a display and MUJOCO_GL unset (glfw cannot start, MuJoCo fails making its context): one line, status 2, no test run, nothing written."""

    class NoDisplay:
        def __init__(self, *args, **kwargs) -> None:
            raise mujoco.FatalError("an OpenGL platform library has not been loaded into this process")

    monkeypatch.setattr(mujoco.gl_context, "GLContext", NoDisplay)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    checkpoint = fake_run(compose_generated, tmp_path, *TINY)  # no weights: had the test run, loading them would have failed
    assert_eval_stops_with_one_line(
        eval_config(compose_generated, checkpoint, "video.tasks=1"), caplog, checkpoint,
        "could not open an OpenGL context with MUJOCO_GL=glfw (MUJOCO_GL unset) (FatalError: an OpenGL platform library has not been loaded",
    )
    assert "MUJOCO_GL=egl" in caplog.records[-1].getMessage()


def test_off_by_default_whatever_the_data() -> None:
    """eval.yaml's video.tasks=0 (and no video node, as an older eval config) is off: no check, no refusal of other data sets."""
    from metalight.visualization.video import video_options

    defaults = OmegaConf.load(Path(__file__).parents[1] / "conf" / "eval.yaml").video
    assert defaults.tasks == 0
    for run in ({"data": {"env": "navigation2d"}}, {"data": {"n_way": 5}}, {}):
        assert video_options(defaults, OmegaConf.create(run)) is None and video_options(None, OmegaConf.create(run)) is None
    on = video_options(OmegaConf.merge(defaults, {"tasks": 2}), OmegaConf.create({"data": {"env": "halfcheetah_vel", "n_test_tasks": 40}, "algo": {"eval_inner_steps": 3}}))
    assert on is not None and on.steps == (0, 1) and (on.width, on.height, on.fps) == (320, 240, 20.0)
