"""eval.py episodes=: exactly the episodes of a JSON or CSV file, Lake's 20 one-shot runs, bad episode files; within-alphabet tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalight.data import FewShotDataModule
from metalight.data.lake_runs import load_lake_runs
from metalight.errors import DataError
from metalight.apply.evaluation import evaluate
from trained_runs import make_run, write_episodes, write_mini_omniglot, write_noise

LAKE = {"url": "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/one-shot-classification/all_runs.zip", "md5": "e8996daecdf12afeeb4a53a179f06b19"}


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_noise(tmp_path_factory.mktemp("noise") / "images")


@pytest.fixture(scope="module")
def run(compose_in, noise: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ProtoNet run on the noise images (any number of ways)."""
    return make_run(compose_in, tmp_path_factory.mktemp("train"), noise, "protonet")


def evaluate_with(compose_in, folder: Path, *overrides: str, data_dir: Path | None = None) -> dict:
    """eval.py's evaluate() with these command-line overrides, outputs under folder (and data under data_dir, when given)."""
    cfg = compose_in(folder, *overrides, config_name="eval")
    if data_dir is not None:
        cfg.paths.data_dir = str(data_dir)
    return evaluate(cfg)


def test_the_episodes_of_a_json_or_csv_file_are_scored_and_saved(compose_in, noise, run, tmp_path, one_thread):
    supports = [{"class00": ["0.png"], "class01": ["1.png"]}, {"class02": ["0.png"], "class03": ["0.png"], "class04": ["2.png"]}]
    listed = write_episodes(noise / "mine.json", noise, supports)  # relative paths: from the file's folder
    episodes = json.loads(listed.read_text())["episodes"]
    rows = ["episode,set,class,image"] + [
        f"e{i},{part},{cls},{noise / image}" for i, episode in enumerate(episodes) for part in ("support", "query") for cls, images in episode[part].items() for image in images
    ]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    from_json = evaluate_with(compose_in, tmp_path, f"ckpt_path={run}", f"episodes={listed}")
    from_csv = evaluate_with(compose_in, tmp_path, f"ckpt_path={run}", f"episodes={tmp_path / 'mine.csv'}")
    assert from_json["n_tasks"] == 2 and list(from_json["episode_accs"]) == ["0", "1"] and list(from_csv["episode_accs"]) == ["e0", "e1"]
    assert from_json["acc"] == pytest.approx(sum(from_json["episode_accs"].values()) / 2) and from_json["acc_ci95"] > 0
    assert [from_json[k] for k in ("acc", "acc_ci95")] == [from_csv[k] for k in ("acc", "acc_ci95")]
    saved = json.loads((run / "checkpoints" / "last.mine.json").read_text())
    assert saved["episode_accs"] == from_csv["episode_accs"]  # the CSV ran last


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"episodes": [{"support": {"a": ["class00/0.png"]}, "query": {"a": ["class00/9.png"]}}]}', r"names image class00/9\.png, but .* does not exist: fix the path"),
        ('{"episodes": [{"support": {"a": ["class00/0.png"]}', r"is not valid JSON .*: fix it"),
        ('{"episodes": [{"support": ["class00/0.png"], "query": {}}]}', r"episode 0: needs \"support\" and \"query\""),
        ("episode,set,class\ne,support,a\n", r"has columns .*: its header must be episode,set,class,image"),
        ("episode,set,class,image\ne,train,a,class00/0.png\n", r":2: expected episode,support\|query,class,image"),
        ('{"episodes": [{"support": {"a": ["class00/0.png"]}, "query": {"b": ["class00/1.png"]}}]}', r"query class 'b' has no support images"),
    ],
)
def test_a_bad_episodes_file_is_one_line_naming_it_and_nothing_is_written(compose_in, noise, run, tmp_path, content, expected):
    path = noise / ("bad.csv" if content.startswith("episode,") else "bad.json")
    path.write_text(content)
    saved = sorted(run.glob("checkpoints/*.json"))
    with pytest.raises(DataError, match=expected) as error:
        evaluate_with(compose_in, tmp_path, f"ckpt_path={run}", f"episodes={path}")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert sorted(run.glob("checkpoints/*.json")) == saved and not list(run.glob("checkpoints/last.bad.json"))
    path.unlink()


def test_lake_runs_are_twenty_runs_of_twenty_training_and_twenty_test_drawings(data_dir):
    runs = load_lake_runs(data_dir / "omniglot", False, **LAKE)
    assert [run.name for run in runs] == [f"run{r:02d}" for r in range(1, 21)]
    for run in runs:
        assert len(run.support) == 20 and len(run.query) == 20
        assert run.classes == [f"class{c:02d}" for c in range(1, 21)]
        answers = [cls for _, cls in run.query]
        assert set(answers) <= set(run.classes)  # the key maps every test drawing to one training drawing
        assert all(ref.name.startswith(f"{run.name}/test/item") for ref, _ in run.query)
    assert [cls for _, cls in runs[0].query[:3]] == ["class08", "class09", "class02"]  # run01/class_labels.txt


def test_lake_runs_are_scored_with_their_error_rate(compose_in, data_dir, run, tmp_path, one_thread):
    results = evaluate_with(compose_in, tmp_path, f"ckpt_path={run}", "episodes=lake_runs")
    assert results["n_tasks"] == 20 and len(results["run_errors"]) == 20
    assert results["error_rate"] == pytest.approx(100 * (1 - results["acc"])) and results["error_rate"] > 50  # untrained, 20-way
    assert json.loads((run / "checkpoints" / "last.lake_runs.json").read_text())["run_errors"] == results["run_errors"]


def test_lake_runs_missing_offline_is_one_line_naming_the_file(compose_in, run, tmp_path):
    unreachable = "lake_runs.url=http://127.0.0.1:9/all_runs.zip"
    with pytest.raises(DataError, match=r"could not download http://127\.0\.0\.1:9/all_runs\.zip into .*omniglot .*place it there as one_shot_runs\.zip"):
        evaluate_with(compose_in, tmp_path, f"ckpt_path={run}", "episodes=lake_runs", unreachable, data_dir=tmp_path / "empty")
    with pytest.raises(DataError, match=r"Lake's one-shot runs not found: neither .*one_shot_runs/ nor .*one_shot_runs\.zip exists"):
        load_lake_runs(tmp_path / "empty" / "omniglot", False, **LAKE)
    assert not list((tmp_path / "empty").rglob("*.zip"))


@pytest.mark.parametrize("within", [True, False])
def test_within_alphabet_tasks_take_their_characters_from_one_alphabet(data_dir, tmp_path, within):
    alphabets = {"images_background": ["Latin", "Greek", "Balinese"], "images_evaluation": ["Angelic", "Tengwar"]}
    root = write_mini_omniglot(tmp_path / "data", data_dir, alphabets)
    options = dict(dataset="omniglot", root=str(root.parent), split="lake", image_size=28, n_way=2, k_shot=1, k_query=1,
                   cache_dir=str(tmp_path / "cache"), eval_batch_size=12, n_test_tasks=12, mean=[0.0], std=[1.0])
    datamodule = FewShotDataModule(**options, within_alphabet=within)
    datamodule.setup()
    files = sorted((root / "images_evaluation").glob("*/*/*.png"))
    by_file = datamodule.input_format()(files)
    support = next(iter(datamodule.test_dataloader()))["support_x"]
    alphabet = [[files[next(i for i, mine in enumerate(by_file) if torch.equal(datamodule.normalize(image), mine))].parts[-3] for image in task] for task in support]
    mixed = sum(len(set(task)) > 1 for task in alphabet)
    assert mixed == 0 if within else mixed > 0
    if within:
        with pytest.raises(DataError, match=r"no alphabet of the train split of omniglot \(lake\) has data.n_way_train=3 characters \(the largest has 2\)"):
            FewShotDataModule(**options, n_way_train=3, within_alphabet=True).setup()  # 4 training characters, 2 per alphabet
