"""The notebooks run top to bottom on a small slice of the real data and short runs, and are committed without outputs."""

import json
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MINI_CLASSES, MINI_IMAGES = 5, 20  # enough for 5-way tasks of 1 + 15 images per class


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_episodes.ipynb", "02_results.ipynb", "03_your_task.ipynb", "04_regression.ipynb", "05_meta_rl.ipynb", "06_text.ipynb", "07_robotics.ipynb"]
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in cells), f"{path.name} holds outputs: clear them"


def _mini_slice(source: Path, target: Path) -> None:
    """The first MINI_CLASSES classes x MINI_IMAGES images of each miniImageNet part, as images_<part>.zip."""
    target.mkdir(parents=True)
    for part in ("train", "val", "test"):
        with zipfile.ZipFile(source / f"images_{part}.zip") as src, zipfile.ZipFile(target / f"images_{part}.zip", "w") as dst:
            by_class: dict[str, list[str]] = {}
            for name in sorted(n for n in src.namelist() if n.endswith(".jpg")):
                by_class.setdefault(name.split("/")[-2], []).append(name)
            for wnid in sorted(by_class)[:MINI_CLASSES]:
                for name in by_class[wnid][:MINI_IMAGES]:
                    dst.writestr(name, src.read(name))


def _register_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Jupyter kernel running this interpreter, on one thread, found before any other (nothing registered globally)."""
    kernel = tmp_path / "jupyter" / "kernels" / "metalight-test"
    kernel.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "metalight test", "language": "python"}
    (kernel / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched first: nothing is registered globally
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def environment(data_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DATA_DIR with the real Omniglot and a miniImageNet slice; a Jupyter kernel running this interpreter."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "omniglot").symlink_to(data_dir / "omniglot")
    _mini_slice(data_dir / "miniimagenet", data / "miniimagenet")
    _register_kernel(tmp_path, monkeypatch)
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setenv("METALIGHT_CACHE", str(cache_dir))
    return data


def _execute(name: str) -> nbformat.NotebookNode:
    """Run notebooks/<name> in a fresh kernel from the notebooks folder; return it with its outputs."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, kernel_name="metalight-test", timeout=120, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return notebook


def _images(notebook: nbformat.NotebookNode) -> int:
    """How many images the notebook's outputs hold."""
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_episodes_notebook(environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from synthetic_data import SIZE, write_folder

    folder = write_folder(environment / "mine", {f"class{i}": 2 + i % 3 for i in range(12)})  # ragged: 2-4 images
    shape = f"data.image_size={SIZE} data.n_way=2 data.k_shot=1 data.k_query=1"
    monkeypatch.setenv("METALIGHT_DATASETS", f"omniglot; miniimagenet; folder data.root={folder} {shape}; cub")
    notebook = _execute("01_episodes.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "omniglot" in text and "4112" in text  # the real Omniglot train classes
    assert f"{'miniimagenet':<14}{MINI_CLASSES:>8}{MINI_CLASSES:>8}{MINI_CLASSES:>8}" in text  # the slice
    assert f"{'folder':<14}{8:>8}{2:>8}{2:>8}{'2-4':>14}" in text  # your own data, split 70/15/15%
    assert "cub: skipped (DataError: CUB-200-2011 not found" in text  # a set whose files are not there
    assert _images(notebook) == 3  # one figure of tasks per data set shown


@pytest.mark.slow
def test_results_notebook_on_two_short_runs(environment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_py_in_process) -> None:
    sweep = tmp_path / "sweep"
    status, output = train_py_in_process(
        environment, tmp_path / "logs", "-m", "algo=maml,reptile", f"hydra.sweep.dir={sweep}", "model=conv4_strided",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", "++trainer.enable_progress_bar=false", "data.batches_per_epoch=1",
        "data.meta_batch_size=2", "data.n_val_tasks=2", "data.n_test_tasks=2", "data.eval_batch_size=2", "data.num_workers=0",
        "data.persistent_workers=false", "algo.eval_inner_steps=3",
    )
    assert status == 0, output[-3000:]
    monkeypatch.setenv("METALIGHT_RUNS", str(sweep / "*"))
    monkeypatch.setenv("METALIGHT_CKPT", str(sweep / "1"))  # job 1 (reptile): its last.ckpt
    notebook = _execute("02_results.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "algo=maml" in text and "algo=reptile" in text
    assert "label 4: before" in text
    assert _images(notebook) == 2  # the curves, the adapted test task


@pytest.mark.slow
def test_your_task_notebook_adapts_a_run_to_a_folder_made_from_lake_run_1(environment: Path, compose_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trained_runs import make_run, write_noise

    run = make_run(compose_in, tmp_path / "train", write_noise(tmp_path / "noise"), "protonet")  # untrained, any number of ways
    monkeypatch.setenv("METALIGHT_CKPT", str(run))
    monkeypatch.setenv("METALIGHT_WAYS", "3")
    notebook = _execute("03_your_task.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert f"ProtoNet from {run / 'checkpoints' / 'last.ckpt'}: 3 classes, 3 queries" in text
    table = text[text.index("query  "):].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["class01_item08.png", "class02_item03.png", "class03_item12.png"]  # run01's answer key
    assert all(abs(sum(float(p) for p in line.split()[2:]) - 1) < 0.01 for line in table)  # probabilities of each query
    assert _images(notebook) == 1  # the support set and the predictions


@pytest.mark.slow
def test_regression_notebook_on_maml_and_pretrained_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_py_in_process) -> None:
    _register_kernel(tmp_path, monkeypatch)
    short = ["trainer.max_steps=10", "data.batches_per_epoch=5", "data.n_val_tasks=4", "data.n_test_tasks=4", "++trainer.enable_progress_bar=false"]
    sweep = tmp_path / "sweep"  # both runs in one sweep: job 0 MAML, job 1 the pretrained baseline
    status, output = train_py_in_process(
        tmp_path, tmp_path / "logs", "-m", "experiment=quick_sinusoid,quick_sinusoid_pretrained", f"hydra.sweep.dir={sweep}", *short
    )
    assert status == 0, output[-3000:]
    monkeypatch.setenv("METALIGHT_MAML", str(sweep / "0"))
    monkeypatch.setenv("METALIGHT_PRETRAINED", str(sweep / "1"))
    notebook = _execute("04_regression.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "MAML: test MSE before adaptation" in text and "pretrained: test MSE before adaptation" in text and "after 10 steps" in text
    assert text.count("MSE on the grid after 10 steps") == 2 and text.count("on 9 query points") == 2
    assert _images(notebook) == 2  # the curves and per-step MSE, the fits


@pytest.mark.slow
def test_meta_rl_notebook_on_maml_pretrained_and_random_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_py_in_process) -> None:
    from metalight.visualization import inner_step_accuracy, read_scalars

    _register_kernel(tmp_path, monkeypatch)
    # 2 meta-steps as 2 epochs of 1 (trainer.max_steps would also train the random baseline, whose max_steps is 0)
    short = ["trainer.max_epochs=2", "data.batches_per_epoch=1", "data.meta_batch_size=2", "++data.rollouts=2", "++data.eval_rollouts=2",
             "++data.horizon=10", "data.n_val_tasks=3", "data.n_test_tasks=3", "data.eval_batch_size=3", "++trainer.enable_progress_bar=false"]
    sweep = tmp_path / "sweep"  # the three runs in one sweep: job 0 MAML-RL, job 1 the pretrained baseline, job 2 the random one
    status, output = train_py_in_process(
        tmp_path, tmp_path / "logs", "-m", "experiment=quick_navigation2d,quick_navigation2d_pretrained,quick_navigation2d_random",
        f"hydra.sweep.dir={sweep}", *short,
    )
    assert status == 0, output[-3000:]
    runs = {"MAML": sweep / "0", "pretrained": sweep / "1", "random": sweep / "2"}
    for name, run in runs.items():
        monkeypatch.setenv(f"METALIGHT_{name.upper()}", str(run))
    notebook = _execute("05_meta_rl.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "average over 3 test goals" in text and "random: no validation (it never trained)" in text
    assert text.count("validation return at the last validation") == 2  # MAML and pretrained
    for name, run in runs.items():  # each run's row of the table: its test return after 0, 1, 2, 3 steps
        per_step = inner_step_accuracy(read_scalars(run), stage="test", metric="return")
        assert len(per_step) == 4
        assert f"{name:<12}" + "".join(f"{v:>8.1f}" for v in per_step) in text, name
        if name != "random":  # the trajectories of the 3 test goals are the test's own episodes: their mean is the test return
            line = text[text.index(f"{name}: return of test goals [0, 1, 2] before adaptation "):].splitlines()[0]
            before, after = (line.split(" before adaptation ")[1].split("; after 3 steps ")[i] for i in (0, 1))
            for values, expected in ((before, per_step[0]), (after, per_step[3])):
                assert abs(sum(map(float, values.split(", "))) / 3 - expected) < 0.1, line
    assert _images(notebook) == 3  # the validation curves, the test return per step, the trajectories


@pytest.mark.slow
def test_text_notebook_trains_compares_with_the_untrained_baseline_and_classifies_sentences(intents_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register_kernel(tmp_path, monkeypatch)
    monkeypatch.setenv("DATA_DIR", str(intents_dir))
    monkeypatch.setenv("METALIGHT_CACHE", str(cache_dir))
    short = ["trainer.max_steps=6", "data.batches_per_epoch=3", "data.n_val_tasks=4", "data.n_test_tasks=8", "data.eval_batch_size=4", f"paths.log_dir={tmp_path / 'logs'}"]
    monkeypatch.setenv("METALIGHT_OVERRIDES", " ".join(short))  # on the default experiment=quick_banking77
    notebook = _execute("06_text.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "trained 6 meta-steps" in text and "ProtoNet (meta-trained): test accuracy" in text
    assert "untrained centroid (cosine): test accuracy" in text and "on the same episodes" in text
    assert "test episode 0:" in text and "of 25 queries right" in text  # 5-way, Dopierre et al.'s 5 queries per class
    rows = text[text.index("untrained centroid\n"):].splitlines()[1:4]
    assert [row.split()[0] for row in rows] == ["how", "is", "my"]  # a row per sentence of your own
    assert all(row.split()[-1] in ("card_arrival", "exchange_rate", "lost_or_stolen_card") for row in rows)
    assert _images(notebook) == 1  # the validation curve beside the baseline
    markdown = [out for cell in notebook.cells for out in cell.get("outputs", []) if "text/markdown" in out.get("data", {})]
    assert len(markdown) == 1 and "| label | class | support utterances |" in markdown[0]["data"]["text/markdown"]


@pytest.mark.slow
def test_robotics_notebook_trains_grbal_and_compares_adapted_unadapted_and_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mujoco", reason="the `rl` extra (pip install -e '.[rl]') is not installed")
    _register_kernel(tmp_path, monkeypatch)
    # one iteration (random episodes) of 12-step episodes, a 8-unit model, 2 held-out bodies: the notebook's cells, not GrBAL's figures;
    # a large online step, so that the adapted episodes differ from the unadapted ones
    short = ["trainer.max_epochs=1", "algo.inner_lr=0.5", "data.batches_per_epoch=2", "data.episode_length=12", "data.past=3", "data.future=2", "data.planner.candidates=6",
             "data.planner.horizon=2", "data.val_episodes=1", "data.test_episodes=2", "data.n_val_tasks=2", "data.n_test_tasks=2", "data.eval_batch_size=2",
             "model.hidden=[8]", f"paths.log_dir={tmp_path / 'logs'}"]
    monkeypatch.setenv("METALIGHT_OVERRIDES", " ".join(short))
    notebook = _execute("07_robotics.ipynb")
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert f"{'0 bthigh':<10}{0:>32}{50:>20}" in text  # the held-out joint: never trained on, always tested
    assert "trained 1 iterations (2 meta-steps)" in text and "held-out body (bthigh crippled), 2 episodes of 12 steps" in text
    returns = {label: float(text.split(f"  {label}")[1].split()[1]) for label in ("adapted online", "without adaptation", "random policy")}
    assert returns["adapted online"] != returns["without adaptation"] and "adaptation gain (paired)" in text
    for name in ("unadapted", "adapted"):  # the replayed episodes are the test's: the same errors
        line = next(line for line in text.splitlines() if line.startswith(f"one-step error {name} "))
        assert line.split()[3] == line.split()[-1].rstrip(")"), line
    rendered = "MuJoCo cannot render here" not in text
    assert _images(notebook) == 1 + rendered  # the two bodies (where MuJoCo renders), the model's error over the episode
