"""Text data (data=banking77 ... and data=text): readers, token caches, episodes of token ids, the published splits, bad input."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from metalight.data.folder import ratio_split
from metalight.errors import ConfigError, DataError
from metalight.text import readers
from metalight.text.datamodule import TextDataModule
from metalight.text.pretrained import PAD_ID, tokenizer_file

pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install 'metalight[text]'")

WORDS = ["card", "transfer", "weather", "alarm", "music", "recipe", "flight", "taxi"]
LONG = "please " * 30  # about 30 tokens: cut by max_tokens=16


def utterances(n_classes: int = 8, per_class: int = 6) -> dict[str, list[str]]:
    """Class name -> distinct utterances naming it; the first utterance of class 0 is long."""
    classes = {
        f"intent_{WORDS[c]}": [f"my {WORDS[c]} question number {j}, thanks" for j in range(per_class)] for c in range(n_classes)
    }
    first = next(iter(classes))
    classes[first][0] = f"{LONG}{WORDS[0]}"
    return classes


def write_jsonl(path: Path, classes: dict[str, list[str]], text: str = "text", label: str = "label") -> Path:
    rows = [(t, name) for name, texts in classes.items() for t in texts]
    order = np.random.default_rng(0).permutation(len(rows))  # rows of a real file are not grouped by class
    path.write_text("".join(json.dumps({text: rows[i][0], label: rows[i][1], "id": int(i)}) + "\n" for i in order))
    return path


def write_csv(path: Path, classes: dict[str, list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["utterance", "intent"])
        writer.writerows([(t, name) for name, texts in classes.items() for t in texts])
    return path


def write_folder(path: Path, classes: dict[str, list[str]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, texts in classes.items():
        (path / f"{name}.txt").write_text("\n".join(texts) + "\n\n")
    return path


def module(root: Path, cache: Path, **overrides) -> TextDataModule:
    """data=text on `root` split 4/2/2 by ratios: 3-way training and 2-way eval tasks, 2 shots, 2 queries, 2 per meta-step."""
    kwargs = {
        "dataset": "text", "root": str(root), "split": "ratios", "n_way": 2, "n_way_train": 3, "k_shot": 2, "k_query": 2,
        "meta_batch_size": 2, "eval_batch_size": 2, "batches_per_epoch": 2, "n_val_tasks": 4, "n_test_tasks": 4, "seed": 1,
        "max_tokens": 16, "source": {"ratios": [0.5, 0.25, 0.25], "split_seed": 0}, "cache_dir": str(cache),
    }
    return TextDataModule(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("text") / "intents.jsonl", utterances())


def test_readers_agree(tmp_path: Path) -> None:
    classes = utterances()
    classes["intent_card"][1] = 'a "quoted", comma\nand a second line'  # CSV quoting across lines
    from_jsonl = readers.read_utterances(write_jsonl(tmp_path / "a.jsonl", classes, "sentence", "intent"), "sentence", "intent")
    from_csv = readers.read_utterances(write_csv(tmp_path / "a.csv", classes), "utterance", "intent")
    assert from_csv == classes, "utterances in file order"
    assert list(from_jsonl) == sorted(classes), "classes sorted by name"
    assert {name: sorted(texts) for name, texts in from_jsonl.items()} == {name: sorted(texts) for name, texts in classes.items()}
    folder_classes = {**classes, "intent_card": [t for t in classes["intent_card"] if "\n" not in t]}
    assert readers.read_utterances(write_folder(tmp_path / "folder", folder_classes)) == folder_classes


def _class_of_rows(dm: TextDataModule, part: str) -> dict[tuple, str]:
    """Token-id row (padding dropped) -> class name, for every utterance of a split (independent of the episode code)."""
    data = dm._datasets[part]
    names = dm.label_names(part)
    rows = {}
    for c, (start, count) in enumerate(zip(data.starts, data.counts)):
        for row in np.asarray(data.images[start : start + count]):
            rows[tuple(int(i) for i in row if i != PAD_ID)] = names[c]
    return rows


def test_episodes_are_token_ids_with_class_major_labels(jsonl: Path, tmp_path: Path) -> None:
    dm = module(jsonl, tmp_path / "cache")
    dm.setup()
    assert (dm.train_classes, dm.val_classes, dm.test_classes) == (4, 2, 2)
    shortest_batch = 16
    for part, loader, n_way in (("train", dm.train_dataloader(), 3), ("test", dm.test_dataloader(), 2)):
        host = next(iter(loader))
        assert host["support_x"].dtype == torch.int32 and host["support_x"].shape == (2, n_way * 2, 16)
        assert host["query_x"].shape == (2, n_way * 2, 16)
        batch = dm.on_after_batch_transfer({k: v.clone() for k, v in host.items()}, 0)
        longest = max(int((host[k] != PAD_ID).sum(-1).max()) for k in ("support_x", "query_x"))
        assert batch["support_x"].dtype == batch["query_x"].dtype == torch.int64
        shortest_batch = min(shortest_batch, longest)
        assert batch["support_x"].shape[-1] == batch["query_x"].shape[-1] == longest, "cut to the batch's longest utterance"
        assert torch.equal(batch["support_x"], host["support_x"][..., :longest].long())
        assert batch["support_y"][0].tolist() == [c for c in range(n_way) for _ in range(2)]
        rows = _class_of_rows(dm, part)
        for task in range(2):
            named = [
                [rows[tuple(int(i) for i in r if i != PAD_ID)] for r, y in zip(batch[x][task], batch[y][task]) if y == c]
                for c in range(n_way)
                for x, y in (("support_x", "support_y"), ("query_x", "query_y"))
            ]
            per_class = [set(named[2 * c]) | set(named[2 * c + 1]) for c in range(n_way)]
            assert all(len(s) == 1 for s in per_class), "a label's utterances all come from one class"
            assert len(set.union(*per_class)) == n_way, "n_way distinct classes"
    assert shortest_batch < 16, "some batch is cut below data.max_tokens"


def test_training_tasks_follow_the_seed_and_eval_tasks_are_fixed(jsonl: Path, tmp_path: Path) -> None:
    def modules(seed: int) -> TextDataModule:
        dm = module(jsonl, tmp_path / "cache", seed=seed)
        dm.setup()
        return dm

    first, again, other = modules(1), modules(1), modules(2)
    keys = [(0, 0), (0, 1), (3, 5)]
    same = first._datasets["train"][keys]
    assert all(torch.equal(same[k], again._datasets["train"][keys][k]) for k in same)
    assert not torch.equal(same["query_x"], other._datasets["train"][keys]["query_x"]), "another seed, other training tasks"
    assert not torch.equal(first._datasets["train"][[(1, 0)]]["query_x"], first._datasets["train"][[(0, 0)]]["query_x"]), "epochs differ"
    for part in ("val_dataloader", "test_dataloader"):
        mine, theirs = (torch.cat([b["query_x"] for b in getattr(dm, part)()]) for dm in (first, other))
        assert torch.equal(mine, theirs), "validation and test tasks depend on eval_seed only"


def test_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", utterances())
    calls = []
    real = readers.read_jsonl
    monkeypatch.setattr(readers, "read_jsonl", lambda *a, **k: calls.append(a) or real(*a, **k))
    module(path, tmp_path / "cache").setup()
    module(path, tmp_path / "cache").setup()
    assert len(calls) == 1, "the second run reads the token cache, not the file"
    grown = utterances(per_class=7)
    write_jsonl(path, grown)
    dm = module(path, tmp_path / "cache")
    dm.setup()
    assert len(calls) == 2 and dm.images_per_class == 7, "a changed file is read and tokenized again"
    module(path, tmp_path / "cache", max_tokens=12).setup()
    assert len(calls) == 3, "another max_tokens tokenizes again"


def test_cut_utterances_are_counted_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tokenizers import Tokenizer

    classes = utterances()
    classes["intent_music"][2] = f"{LONG}music"
    path = write_jsonl(tmp_path / "data.jsonl", classes)
    tokenizer = Tokenizer.from_file(str(tokenizer_file()))
    texts = [t for ts in classes.values() for t in ts]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
    assert sum(n > 16 for n in lengths) == 2
    with caplog.at_level(logging.INFO, logger="metalight"):
        dm = module(path, tmp_path / "cache")
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
    said = [r.getMessage() for r in caplog.records if "data.max_tokens=16 cut" in r.getMessage()]
    assert said == [f"data.max_tokens=16 cut 2 of the {len(texts)} utterances of {path.resolve()} (the longest has {max(lengths)} tokens): raise data.max_tokens to keep them whole."]


def test_ratio_and_list_splits(jsonl: Path, tmp_path: Path) -> None:
    dm = module(jsonl, tmp_path / "cache")
    dm.setup()
    assert {p: sorted(dm.label_names(p)) for p in ("train", "val", "test")} == ratio_split(sorted(utterances()), [0.5, 0.25, 0.25], 0)
    chosen = {
        "train": ["intent_flight", "intent_music", "intent_recipe", "intent_transfer"],
        "val": ["intent_alarm", "intent_card"],
        "test": ["intent_taxi", "intent_weather"],
    }
    for part, names in chosen.items():
        (tmp_path / f"{part}.txt").write_text("\n".join(names) + "\n")
    folder = write_folder(tmp_path / "classes", utterances())
    table = write_csv(tmp_path / "table.csv", utterances())  # rows in class order, as the folder's files
    columns = {"text_column": "utterance", "label_column": "intent"}
    listed = module(table, tmp_path / "cache", split="auto", source={"lists": str(tmp_path), **columns})
    listed.setup()
    assert {p: listed.label_names(p) for p in chosen} == chosen
    for part in chosen:
        (folder / f"{part}.txt").write_text("\n".join(chosen[part]) + "\n")
    from_folder = module(folder, tmp_path / "cache", split="lists")  # the lists beside the <class>.txt files, not classes
    from_folder.setup()
    assert {p: from_folder.label_names(p) for p in chosen} == chosen
    assert torch.equal(next(iter(from_folder.test_dataloader()))["query_x"], next(iter(listed.test_dataloader()))["query_x"]), "the same tasks"


def test_small_classes_are_named_or_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    classes = utterances()
    classes["intent_taxi"] = classes["intent_taxi"][:3]
    path = write_jsonl(tmp_path / "data.jsonl", classes)
    with pytest.raises(DataError, match=r"= 4 utterances per class, but 1 of the 2 classes of the val split of text hold fewer: 'intent_taxi' \(3\)"):
        module(path, tmp_path / "cache", n_way=1).setup()
    with caplog.at_level(logging.WARNING, logger="metalight"):
        dropped = module(path, tmp_path / "cache", n_way=1, small_classes="drop")
        dropped.setup()
    kept = [name for name in ratio_split(sorted(classes), [0.5, 0.25, 0.25], 0)["val"] if name != "intent_taxi"]
    assert dropped.label_names("val") == kept and len(kept) == 1 and "left out (data.small_classes=drop): 'intent_taxi' (3)" in caplog.text


def test_encode_and_flat_batches(jsonl: Path, tmp_path: Path) -> None:
    dm = module(jsonl, tmp_path / "cache", train_mode="flat", batch_size=5)
    dm.setup()
    ids = dm.encode(["my card question number 1, thanks", "card"])
    assert ids.dtype == torch.int64 and ids.shape == (2, int((ids[0] != PAD_ID).sum()))
    assert ids[1, 1:].eq(PAD_ID).all() and ids[1, 0] != PAD_ID, "padded at the end, to the longest"
    every = np.asarray(dm._datasets["val"].images)  # the whole token cache, all classes
    padded = np.pad(ids[0].numpy(), (0, 16 - ids.shape[1]))
    assert (every == padded).all(axis=1).sum() == 1, "tokenized as the data set was"
    with pytest.raises(DataError, match="utterance 1 of the 2 given is empty"):
        dm.encode(["fine", "  "])
    host = next(iter(dm.train_dataloader()))
    assert host["x"].shape == (5, 16) and host["y"].shape == (5,)
    batch = dm.on_after_batch_transfer(dict(host), 0)
    assert batch["x"].dtype == torch.int64 and batch["x"].shape[1] == int((host["x"] != PAD_ID).sum(1).max())
    assert dm.state_dict() == {"tokenizer": None, "max_tokens": 16}
    with pytest.raises(ConfigError, match="data.tokenizer=/elsewhere/tokenizer.json but this run has data.tokenizer=None"):
        dm.load_state_dict({"tokenizer": "/elsewhere/tokenizer.json", "max_tokens": 16})


def test_published_splits_and_cross_data_set_tasks(intents_dir: Path, cache_dir: Path) -> None:
    def setup(name: str, **options) -> TextDataModule:
        dm = TextDataModule(name, str(intents_dir), 1, n_val_tasks=4, n_test_tasks=4, cache_dir=str(cache_dir), **options)
        dm.setup()
        return dm

    banking = setup("banking77")
    assert (banking.train_classes, banking.val_classes, banking.test_classes) == (25, 25, 27)
    listed = intents_dir / "intents" / "BANKING77" / "few_shot" / "01" / "labels.test.txt"
    assert banking.label_names("test") == listed.read_text().split()
    assert banking.images_per_class >= 6 and banking.k_query == 5, "Dopierre et al.'s 5 queries per class"
    cross = setup("clinc150", test_source="banking77", train_sources=["hwu64", "liu"])
    assert cross.label_names("test") == banking.label_names("test") and cross.val_classes == 50
    assert torch.equal(next(iter(cross.test_dataloader()))["query_x"], next(iter(banking.test_dataloader()))["query_x"])
    train = cross.label_names("train")
    assert len(train) == 16 + 18 and sum(n.startswith("hwu64/") for n in train) == 16 and sum(n.startswith("liu/") for n in train) == 18


BAD_INPUT = {
    "empty": (lambda d: (d / "e.jsonl").write_text("\n"), "e.jsonl", [], r"e.jsonl is empty"),
    "column": (
        lambda d: write_jsonl(d / "c.jsonl", utterances(), text="sentence"), "c.jsonl", [],
        r"c.jsonl:1: no 'text' column \(the columns found: 'sentence', 'label', 'id'\): set data.source.text_column",
    ),
    "utf8": (
        lambda d: (d / "u.jsonl").write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "fine", "label": "b"}\n{"text": "caf\xe9", "label": "a"}\n'),
        "u.jsonl", [], r"u.jsonl:3: bytes that are not UTF-8 \(b'\\xe9\"",
    ),
    "small": (
        lambda d: write_jsonl(d / "s.jsonl", {**utterances(), "intent_taxi": ["one", "two"]}), "s.jsonl", ["data.split=ratios"],
        r"'intent_taxi' \(2\)\. Lower them, add utterances to those classes, or set data.small_classes=drop",
    ),
    "ways": (
        lambda d: write_jsonl(d / "w.jsonl", utterances()), "w.jsonl", ["data.n_way=3"],
        r"data.n_way=3 but the val split of text \(auto\) has only 1 classes: lower data.n_way to at most 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_text_input_is_one_line(case: str, tmp_path: Path, train_py_in_process) -> None:
    write, name, overrides, message = BAD_INPUT[case]
    write(tmp_path)
    args = ["data=text", f"data.root={tmp_path / name}", "data.k_query=2", "algo=protonet", "debug=fast_dev_run", *overrides]
    status, output = train_py_in_process(tmp_path, tmp_path / "logs", *args)
    assert status == 2, output[-2000:]
    assert re.search(message, output) and "Traceback" not in output, output[-2000:]
    assert not list(tmp_path.glob("logs/*/runs/*")), "the stopped run left its folder behind"


def test_bad_split_number_is_one_line(tmp_path: Path, train_py_in_process) -> None:
    status, output = train_py_in_process(tmp_path, tmp_path / "logs", "data=banking77", "data.split=6", "algo=protonet", "debug=fast_dev_run")
    assert status == 2 and "data.split=6 is not a split of banking77: use one of 1, 2, 3, 4, 5" in output and "Traceback" not in output
    assert not list(tmp_path.glob("logs/*/runs/*"))


@pytest.mark.parametrize("data", [*readers.INTENT_SETS, "text"])
def test_text_configs_compose(compose_generated, tmp_path: Path, data: str) -> None:
    from hydra.utils import instantiate

    from metalight.runs.config import validate_config

    cfg = compose_generated(f"data={data}", "algo=protonet", *([f"data.root={tmp_path}"] if data == "text" else []))
    validate_config(cfg)
    dm = instantiate(cfg.data)
    assert isinstance(dm, TextDataModule) and dm.dataset == data and dm.modality == "text"
    assert cfg.model._target_ == "metalight.text.encoders.TextBag" and cfg.monitor.metric == "acc"
    assert (dm.n_way, dm.k_shot, dm.k_query, dm.n_test_tasks, dm.max_tokens) == (5, 1, 5, 600, 64), "Dopierre et al.'s protocol"


def _word_tokenizer(path: Path, words: list[str], pad_special: bool) -> Path:
    """A tokenizers JSON splitting on whitespace and punctuation: id 0 '[PAD]' (special, or an ordinary word), 1 '[UNK]', then `words`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    if pad_special:
        tokenizer.add_special_tokens(["[PAD]", "[UNK]"])
    tokenizer.save(str(path))
    return path


def test_own_tokenizer(jsonl: Path, tmp_path: Path) -> None:
    words = ["my", "question", "number", "thanks", ",", *WORDS]
    own = _word_tokenizer(tmp_path / "words.json", words, pad_special=True)
    dm = module(jsonl, tmp_path / "cache", tokenizer=str(own))
    dm.setup()
    ids = dm.encode(["my card question number 7, thanks", "taxi please"])
    vocabulary = 2 + len(words)
    assert ids.tolist() == [[2, 2 + words.index("card"), 3, 4, 1, 6, 5], [2 + words.index("taxi"), 1, 0, 0, 0, 0, 0]]
    assert int(np.asarray(dm._datasets["val"].images).max()) < vocabulary, "the cache holds the word tokenizer's ids"
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*plain.json: its id 0 is the ordinary token '\[PAD\]'"):
        module(jsonl, tmp_path / "cache", tokenizer=str(_word_tokenizer(tmp_path / "plain.json", words, pad_special=False))).setup()
