"""A text run applied: FewShotLearner and predict.py classify strings with eval.py's logits, eval.py scores text episode files,
the strings are tokenized as the data module tokenizes its own, and bad text input is one line with nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from metalight.apply.evaluation import evaluate, restore_run_config
from metalight.apply.fixed_episodes import episode_batches, score_episodes
from metalight.apply.learner import FewShotLearner
from metalight.apply.prediction import predict
from metalight.data.episode_files import read_episodes
from metalight.errors import ConfigError, DataError
from metalight.runs.checkpoints import load_weights, restore_input_format
from metalight.runs.training import build
from metalight.text.datamodule import TextDataModule, TextFormat
from trained_runs import TOPICS, make_text_run, write_utterances

pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install 'metalight[text]'")
pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORT = {"card": ["my card was declined at the shop"], "taxi": ["book me a taxi to the station"]}
QUERY = {"card": ["why was my card refused", "card payment failed"], "taxi": ["i need a cab now", "get me a taxi home"]}


@pytest.fixture(scope="module")
def utterances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_utterances(tmp_path_factory.mktemp("text") / "utterances.csv")


@pytest.fixture(scope="module")
def runs(compose_in, utterances: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained text runs: a ProtoNet (any ways) and a 2-way MAML (a fixed head)."""
    return {algo: make_text_run(compose_in, tmp_path_factory.mktemp(algo), utterances, algo) for algo in ("protonet", "maml")}


def write_text_episodes(folder: Path) -> tuple[Path, Path]:
    """The same two episodes (SUPPORT/QUERY, then its classes swapped) as a JSON and a CSV episodes file."""
    episodes = [{"name": "a", "support": SUPPORT, "query": QUERY}, {"name": "b", "support": dict(reversed(SUPPORT.items())), "query": QUERY}]
    (folder / "text.json").write_text(json.dumps(episodes))
    with (folder / "text.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["episode", "set", "class", "text"])
        writer.writerows([(e["name"], part, c, t) for e in episodes for part in ("support", "query") for c, texts in e[part].items() for t in texts])
    return folder / "text.json", folder / "text.csv"


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_strings_get_the_logits_eval_py_scores_the_episode_with(compose_in, runs, tmp_path, algo):
    run = runs[algo]
    episodes, _ = write_text_episodes(tmp_path)
    cfg = compose_in(tmp_path / "eval", f"ckpt_path={run}", f"episodes={episodes}", config_name="eval")
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    objects = build(restore_run_config(path, cfg, [f"episodes={episodes}"]))
    load_weights(objects["algorithm"], checkpoint, path)
    batches = episode_batches(read_episodes(episodes, "text"), restore_input_format(objects["datamodule"], checkpoint, path))
    _, (eval_logits, _) = score_episodes(objects["algorithm"], objects["trainer"], batches)

    learner = FewShotLearner.load(run).adapt([t for texts in SUPPORT.values() for t in texts], list(SUPPORT))
    assert learner.modality == "text" and learner.classes == ["card", "taxi"]
    queries = [t for texts in QUERY.values() for t in texts]
    logits = learner.logits(queries)  # the support and queries tokenized apart, padded to one length: the same logits
    assert logits.shape == (4, 2) and logits.std() > 0
    torch.testing.assert_close(logits, eval_logits, rtol=1e-5, atol=1e-6)
    assert torch.allclose(learner.predict(queries).sum(-1), torch.ones(4))
    assert learner.embed(queries).shape == (4, 8)
    with pytest.raises(ConfigError, match=r"got one string: give a list of utterances"):
        learner.predict("why was my card refused")


def test_a_string_becomes_the_ids_the_datamodule_caches_for_it(utterances, tmp_path):
    datamodule = TextDataModule("text", str(utterances), "auto", n_way=2, k_shot=1, k_query=2, source={"ratios": [0.5, 0.25, 0.25], "split_seed": 0}, cache_dir=str(tmp_path), max_tokens=5)
    datamodule.setup()
    text_format = datamodule.input_format()
    assert text_format == TextFormat(None, 5)
    ids, labels = datamodule.utterances("test", per_class=4)
    names = datamodule.label_names("test")
    texts = [f"my {names[c]} question number {j} please" for c, j in zip(labels, [0, 1, 2, 3] * 2)]
    assert torch.equal(text_format(texts), ids) and ids.shape == (8, 5)  # cut at max_tokens=5 both ways
    assert text_format.decode(text_format(["my card question"]))[0] == "my card question"
    assert datamodule.task_class_names("test", 0)[0] in names and sorted(names) == sorted(set(TOPICS) & set(names))


def test_predict_py_classifies_a_text_file_and_a_csv_column(compose_in, runs, tmp_path, capsys):
    support = tmp_path / "support.csv"
    support.write_text("utterance,intent\n" + "".join(f'"{t}",{c}\n' for c, texts in SUPPORT.items() for t in texts) + "please pay my card bill,card\n")
    queries = [t for texts in QUERY.values() for t in texts]
    (tmp_path / "queries.txt").write_text("\n".join(queries) + "\n\n")
    (tmp_path / "queries.csv").write_text("id,utterance\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(queries)))
    columns = ["columns.text_column=utterance", "columns.label_column=intent"]
    expected = FewShotLearner.load(runs["protonet"]).adapt([*SUPPORT["card"], *SUPPORT["taxi"], "please pay my card bill"], ["card", "taxi", "card"]).predict(queries)
    for query in ("queries.txt", "queries.csv"):
        output = predict(compose_in(tmp_path / "p", f"ckpt_path={runs['protonet']}", f"support={support}", f"query={tmp_path / query}", f"output={tmp_path / 'out.csv'}", *columns, config_name="predict"))
        with output.open() as file:
            rows = list(csv.DictReader(file))
        assert [row["text"] for row in rows] == queries
        probabilities = torch.tensor([[float(row[f"prob_{c}"]) for c in ("card", "taxi")] for row in rows])
        torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
        assert [row["predicted"] for row in rows] == [("card", "taxi")[i] for i in probabilities.argmax(1)]
    assert "i need a cab now" in capsys.readouterr().out


def test_bad_text_input_to_predict_is_one_line_and_nothing_is_written(compose_in, runs, tmp_path):
    (tmp_path / "support.csv").write_text("text,label\nmy card was declined,card\nbook a taxi,taxi\n")
    (tmp_path / "no_label.csv").write_text("text,intent\nmy card was declined,card\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "queries.txt").write_text("my card\n")
    (tmp_path / "queries.csv").write_text("id,sentence\n0,my card\n")
    (tmp_path / "latin1.txt").write_bytes("my card\ncaf\xe9 please\n".encode("latin-1"))
    (tmp_path / "three.csv").write_text("text,label\na card,card\na taxi,taxi\nthe weather,weather\n")
    output = tmp_path / "out.csv"
    cases = [
        (DataError, rf"{tmp_path / 'no_label.csv'}: no 'label' column in the header .*: set columns.label_column", runs["protonet"], "no_label.csv", "queries.txt"),
        (DataError, rf"query={tmp_path / 'empty.txt'} is empty: write one utterance a line", runs["protonet"], "support.csv", "empty.txt"),
        (DataError, rf"{tmp_path / 'queries.csv'}: no 'text' column in the header .*: set columns.text_column", runs["protonet"], "support.csv", "queries.csv"),
        (DataError, rf"{tmp_path / 'latin1.txt'}:2: bytes that are not UTF-8", runs["protonet"], "support.csv", "latin1.txt"),
        (DataError, rf"support={tmp_path / 'queries.txt'} is not a .csv or .jsonl file", runs["protonet"], "queries.txt", "queries.txt"),
        (ConfigError, r"this MAML learner scores exactly 2 classes .* support set has 3", runs["maml"], "three.csv", "queries.txt"),
    ]
    for error, message, run, support, query in cases:
        with pytest.raises(error, match=message) as raised:
            predict(compose_in(tmp_path / "p", f"ckpt_path={run}", f"support={tmp_path / support}", f"query={tmp_path / query}", f"output={output}", config_name="predict"))
        assert "\n" not in str(raised.value) and not output.exists()


def test_eval_py_scores_a_text_episodes_file_as_json_or_csv(compose_in, runs, tmp_path):
    listed, rows = write_text_episodes(tmp_path)
    results = [evaluate(compose_in(tmp_path / "e", f"ckpt_path={runs['protonet']}", f"episodes={path}", config_name="eval")) for path in (listed, rows)]
    assert [r["n_tasks"] for r in results] == [2, 2] and list(results[0]["episode_accs"]) == ["a", "b"]
    assert results[0]["episode_accs"] == results[1]["episode_accs"] and results[0]["acc"] == results[1]["acc"]
    # swapping the support classes swaps the labels, not the predictions: both episodes score the same
    assert results[0]["episode_accs"]["a"] == results[0]["episode_accs"]["b"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("episode,set,class,image\ne,support,a,hello\n", r"has columns .*: its header must be episode,set,class,text"),
        ('[{"support": {"a": ["hello"]}, "query": {"b": ["hi"]}}]', r"query class 'b' has no support utterances"),
        ('[{"support": {"a": ["hello"]}, "query": {"a": ["  "]}}]', r"an utterance of class 'a' is empty"),
    ],
)
def test_a_bad_text_episodes_file_is_one_line_naming_it(compose_in, runs, tmp_path, content, expected):
    path = tmp_path / ("bad.csv" if content.startswith("episode,") else "bad.json")
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as error:
        evaluate(compose_in(tmp_path / "e", f"ckpt_path={runs['protonet']}", f"episodes={path}", config_name="eval"))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not list(runs["protonet"].glob("checkpoints/last.bad.json"))

