"""predict.py: a CSV row per query image with probabilities that sum to 1, and one line, status 2 and nothing written for each bad input."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalight.errors import CheckpointError, ConfigError, DataError
from metalight.apply.learner import FewShotLearner
from metalight.apply.prediction import predict
from trained_runs import make_run, write_noise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_noise(tmp_path_factory.mktemp("noise") / "images")


@pytest.fixture(scope="module")
def runs(compose_in, noise: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained runs: a ProtoNet (any ways) and a 2-way MAML (a fixed head)."""
    return {algo: make_run(compose_in, tmp_path_factory.mktemp(algo), noise, algo) for algo in ("protonet", "maml")}


def support_folder(where: Path, noise: Path, classes: dict[str, list[str]]) -> Path:
    """<where>/<class>/<files copied from the noise images>."""
    for name, files in classes.items():
        (where / name).mkdir(parents=True)
        for file in files:
            shutil.copy(noise / file, where / name / Path(file).name)
    return where


def predict_with(compose_in, folder: Path, *overrides: str) -> Path:
    """predict.py's predict() with these command-line overrides, outputs under folder."""
    return predict(compose_in(folder, *overrides, config_name="predict"))


def test_predict_writes_one_row_per_query_with_probabilities_summing_to_one(compose_in, noise, runs, tmp_path, capsys):
    support = support_folder(tmp_path / "support", noise, {"cat": ["class00/0.png"], "dog": ["class01/0.png", "class01/1.png"], "eel": ["class02/0.png"]})
    for query, expected in ((f"'{noise}/class0[23]/*.png'", sorted(noise.glob("class0[23]/*.png"))), (noise / "class04", sorted(noise.glob("class04/*.png")))):
        output = predict_with(compose_in, tmp_path / "predict", f"ckpt_path={runs['protonet']}", f"support={support}", f"query={query}", f"output={tmp_path / 'out.csv'}")
        with output.open() as file:
            rows = list(csv.DictReader(file))
        assert [row["path"] for row in rows] == [str(q) for q in expected]
        probabilities = torch.tensor([[float(row[f"prob_{c}"]) for c in ("cat", "dog", "eel")] for row in rows])
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(rows)), atol=1e-5)
        assert [row["predicted"] for row in rows] == [("cat", "dog", "eel")[i] for i in probabilities.argmax(dim=1)]
        learner = FewShotLearner.load(runs["protonet"]).adapt(*_support_of(support))
        assert torch.allclose(learner.predict(expected), probabilities, atol=1e-5)
        printed = capsys.readouterr().out
        assert "predicted" in printed and all(q.name in printed for q in expected)  # the table (a long path shown by its end)


def _support_of(folder: Path) -> tuple[list[Path], list[str]]:
    files = sorted(folder.glob("*/*.png"))
    return files, [f.parent.name for f in files]


@pytest.mark.slow
def test_a_bad_input_ends_with_one_line_status_2_and_no_folder(noise, runs, tmp_path, data_dir, cache_dir):
    support = support_folder(tmp_path / "support", noise, {"cat": ["class00/0.png"], "dog": []})
    args = [f"ckpt_path={runs['protonet']}", f"support={support}", f"query={noise}", f"output={tmp_path / 'out.csv'}", f"paths.log_dir={tmp_path / 'logs'}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DATA_DIR=str(data_dir), METALIGHT_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert f"DataError: class folder {support / 'dog'} holds no images (.png/.jpg/.jpeg): add some, or remove the folder." in output
    assert not (tmp_path / "out.csv").exists() and not list((tmp_path / "logs").glob("predict/runs/*"))


def test_bad_inputs_are_one_line_naming_the_path_and_nothing_is_written(compose_in, noise, runs, tmp_path):
    good = support_folder(tmp_path / "good", noise, {"cat": ["class00/0.png"], "dog": ["class01/0.png"]})
    three = support_folder(tmp_path / "three", noise, {"a": ["class00/0.png"], "b": ["class01/0.png"], "c": ["class02/0.png"]})
    corrupt = support_folder(tmp_path / "corrupt", noise, {"cat": ["class00/0.png"], "dog": ["class01/0.png"]})
    (corrupt / "dog" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    no_config = shutil.copytree(runs["protonet"], tmp_path / "copied_run", ignore=shutil.ignore_patterns(".hydra"))
    output = tmp_path / "out.csv"
    cases = [
        (DataError, rf"cannot read image {corrupt / 'dog' / 'broken.png'} \(.*replace it", runs["protonet"], corrupt, noise),
        (DataError, rf"{tmp_path / 'notes.txt'} is not an image \(\.png/\.jpg/\.jpeg\): remove it", runs["protonet"], good, tmp_path / "notes.txt"),
        (ConfigError, r"this MAML learner scores exactly 2 classes .* the support set has 3: give it 2 classes", runs["maml"], three, noise),
        (DataError, rf"query={tmp_path / 'empty'} names no images .*: give a folder of images", runs["protonet"], good, tmp_path / "empty"),
        (DataError, r"query=.*/\*\.jpg names no images", runs["protonet"], good, f"{noise}/*/*.jpg"),
        (CheckpointError, rf"{no_config / '.hydra' / 'config.yaml'} is missing: .* copy the folder's .hydra/ with it", no_config, good, noise),
    ]
    for error, message, run, support, query in cases:
        with pytest.raises(error, match=message) as raised:
            predict_with(compose_in, tmp_path / "predict", f"ckpt_path={run}", f"support={support}", f"query={query}", f"output={output}")
        assert "\n" not in str(raised.value) and not output.exists()
