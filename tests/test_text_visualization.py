"""Text runs in TensorBoard: the episode table (support utterances per class, each query's prediction, right or wrong)
and the test classes' embeddings in the projector, each point the body's embedding of its utterance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metalight.apply.learner import FewShotLearner
from metalight.runs.training import train
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


def test_a_text_run_puts_its_test_classes_embeddings_in_the_projector(compose_train, tmp_path: Path):
    utterances = write_utterances(tmp_path / "utterances.csv", per_class=5)
    cfg = compose_train(*TEXT_SHAPE, f"data.root={utterances}", "algo=protonet", "trainer.max_steps=1", "callbacks.test_embeddings.per_class=4")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (folder,) = {p.parent for p in run.glob("tensorboard/**/test_embeddings/metadata.tsv")}
    rows = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
    assert rows[0] == ["utterance", "class"] and len(rows) == 1 + 2 * 4  # 2 test classes (ratios 0.5/0.25/0.25 of 8), 4 each
    texts, classes = [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
    assert len(set(classes)) == 2 and set(classes) <= set(TOPICS)
    assert texts == [f"my {c} question number {j} please" for c in dict.fromkeys(classes) for j in range(4)]
    vectors = torch.tensor([[float(v) for v in line.split("\t")] for line in (folder / "tensors.tsv").read_text().splitlines()])
    (run / ".hydra").mkdir()
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    expected = FewShotLearner.load(run / "checkpoints" / "last.ckpt").embed(texts)
    assert vectors.shape == (8, 8) and expected.std() > 0
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-5)
