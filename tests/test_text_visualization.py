"""Text runs in TensorBoard: the episode table (support utterances per class, each query's prediction, right or wrong)
and the test classes' embeddings in the projector, each point the body's embedding of its utterance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metalight.apply.learner import FewShotLearner
from metalight.runs.training import train
from metalight.visualization import read_scalars
from metalight.visualization.text import episode_table
from trained_runs import TEXT_SHAPE, TOPICS, write_utterances

pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install 'metalight[text]'")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_episode_table_lists_each_class_support_and_each_query_prediction():
    support, support_y = ["my card | was declined", "book a taxi", "a cab please"], torch.tensor([0, 1, 1])
    query, query_y = ["card refused", "need a taxi now"], torch.tensor([0, 1])
    table = episode_table(support, support_y, query, query_y, ["card", "taxi"], torch.tensor([1, 1]), torch.tensor([0, 0])).splitlines()
    assert table[2] == "| 0 | card | my card \\| was declined |"  # a pipe inside an utterance does not split the cell
    assert table[3] == "| 1 | taxi | book a taxi · a cab please |"
    assert table[5] == "| query | class | before | predicted |  |"
    assert table[7:] == ["| card refused | card | taxi | card | ✓ |", "| need a taxi now | taxi | taxi | card | ✗ |"]
    without = episode_table(support, support_y, query, query_y, ["card", "taxi"], None, torch.tensor([0, 1])).splitlines()
    assert without[5] == "| query | class | predicted |  |" and without[-1] == "| need a taxi now | taxi | taxi | ✓ |"


def test_a_text_run_logs_its_validation_episode_as_a_table_and_its_test_embeddings_in_the_projector(compose_train, tmp_path: Path):
    utterances = write_utterances(tmp_path / "utterances.csv", per_class=5)
    cfg = compose_train(
        *TEXT_SHAPE, f"data.root={utterances}", "algo=maml", "algo.eval_inner_steps=1", "trainer.max_steps=2", "callbacks.test_embeddings.per_class=4"
    )
    _, objects = train(cfg)
    run = Path(cfg.paths.output_dir)

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tables = [event.tensor_proto.string_val[0].decode() for event in events.Tensors("val_task/episode/text_summary")]
    assert len(tables) == len(read_scalars(run)["val/acc"]["step"]) == 2  # one per validation
    datamodule = objects["datamodule"]
    classes = datamodule.task_class_names("val", 0)  # validation task 0's classes, in label order
    rows = tables[-1].splitlines()
    assert rows[rows.index("| label | class | support utterances |") + 2 :][:2] == [
        f"| {c} | {name} | my {name} question number {j} please |" for c, (name, j) in enumerate(zip(classes, _support_positions(datamodule)))
    ]
    queries = [row for row in rows if row.endswith(("| ✓ |", "| ✗ |"))]
    assert len(queries) == 4 and rows[rows.index(queries[0]) - 2] == "| query | class | before | predicted |  |"  # MAML adapts
    right = sum(row.endswith("✓ |") for row in queries) / 4
    assert f"Query accuracy {right:.3f}." in tables[-1]

    (folder,) = {p.parent for p in run.glob("tensorboard/**/test_embeddings/metadata.tsv")}
    rows = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
    assert rows[0] == ["utterance", "class"] and len(rows) == 1 + 2 * 4  # 2 test classes (ratios 0.5/0.25/0.25 of 8), 4 each
    texts, classes = [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
    assert len(set(classes)) == 2 and set(classes) <= set(TOPICS)
    assert texts == [f"my {c} question number {j} please" for c in dict.fromkeys(classes) for j in range(4)]
    vectors = torch.tensor([[float(v) for v in line.split("\t")] for line in (folder / "tensors.tsv").read_text().splitlines()])
    (run / ".hydra").mkdir()
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    tested = objects["trainer"].checkpoint_callback.best_model_path  # the test (and the projector) use the best checkpoint
    expected = FewShotLearner.load(tested).embed(texts)
    assert vectors.shape == (8, 8) and expected.std() > 0
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-5)


def _support_positions(datamodule) -> list[int]:
    """Which utterance of its class each class of validation task 0 shows as its (one) support utterance."""
    _, samples = datamodule._datasets["val"].choose(0, 0)
    return [int(row[0]) for row in samples]
