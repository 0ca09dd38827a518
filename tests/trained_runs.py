"""Run folders as train.py leaves them, made in a second from untrained weights, the noise images they read, and a tiny Omniglot."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from metalight.runs.training import build_data_and_algorithm

ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "protonet", "baseline")
CLASSES, PER_CLASS, FILE_SIZE, IMAGE_SIZE = 12, 3, 12, 8  # noise images 12x12, read at 8x8 (resized)
SHAPE = (
    f"data.image_size={IMAGE_SIZE}", "data.n_way=2", "data.k_shot=1", "data.k_query=2", "data.source.ratios=[0.5,0.25,0.25]",
    "data.meta_batch_size=2", "data.eval_batch_size=2", "data.n_val_tasks=2", "data.n_test_tasks=2", "data.batches_per_epoch=1",
    "model=conv4_strided", "model.hidden=4",
)


def quick(algo: str) -> tuple[str, ...]:
    """Overrides that make `algo` cheap to evaluate (two evaluation inner steps, two passes of Baseline's head fit)."""
    cheap = {"protonet": (), "baseline": ("algo.fit_epochs=2",)}
    return (f"algo={algo}", *cheap.get(algo, ("algo.eval_inner_steps=2",)))


def write_noise(root: Path) -> Path:
    """CLASSES class folders under root of PER_CLASS random RGB images, each FILE_SIZE pixels square."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
        for j in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (FILE_SIZE, FILE_SIZE, 3), dtype=np.uint8)).save(root / f"class{c:02d}" / f"{j}.png")
    return root


def make_run(compose_in, folder: Path, images: Path, algo: str) -> Path:
    """A run folder as train.py leaves it (.hydra/config.yaml, checkpoints/last.ckpt with the data's mean/std), untrained weights."""
    cfg = compose_in(folder, "data=folder", f"data.root={images}", *SHAPE, *quick(algo))
    return _saved_run(cfg, folder / "run")


def _saved_run(cfg, run: Path) -> Path:
    """The run folder of composed config `cfg`: .hydra/config.yaml and checkpoints/last.ckpt of its untrained algorithm."""
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    datamodule, algorithm = build_data_and_algorithm(cfg)
    datamodule.setup()
    if hasattr(algorithm, "build_classifier"):  # Baseline's pretraining classifier, built by fit's setup
        algorithm.build_classifier(datamodule.train_classes)
    (run / "checkpoints").mkdir()
    checkpoint = {"state_dict": algorithm.state_dict(), "hyper_parameters": dict(algorithm.hparams), type(datamodule).__qualname__: datamodule.state_dict()}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    return run


TOPICS = ("card", "transfer", "weather", "alarm", "music", "recipe", "flight", "taxi")
TEXT_SHAPE = (
    "data=text", "model=text_bag", "model.hidden=[8]", "data.n_way=2", "data.k_shot=1", "data.k_query=2",
    "data.source.ratios=[0.5,0.25,0.25]", "data.meta_batch_size=2", "data.eval_batch_size=2", "data.n_val_tasks=2",
    "data.n_test_tasks=2", "data.batches_per_epoch=1",
)


def write_utterances(path: Path, per_class: int = 4) -> Path:
    """A CSV (text,label) of len(TOPICS) classes, each `per_class` short utterances about its topic word."""
    rows = ["text,label"] + [f"my {topic} question number {j} please,{topic}" for topic in TOPICS for j in range(per_class)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def make_text_run(compose_in, folder: Path, utterances: Path, algo: str) -> Path:
    """make_run on text: a run folder of data=text on `utterances` with a tiny bag of WordLlama's embeddings, untrained."""
    cfg = compose_in(folder, *TEXT_SHAPE, f"data.root={utterances}", *quick(algo))
    return _saved_run(cfg, folder / "run")


def write_episodes(path: Path, images: Path, episodes: list[dict[str, list[str]]]) -> Path:
    """A JSON episodes file: each episode {class: [support file names]} + the other files of those classes as queries."""
    listed = []
    for support in episodes:
        query = {c: [f"{c}/{f.name}" for f in sorted((images / c).iterdir()) if f.name not in names] for c, names in support.items()}
        listed.append({"support": {c: [f"{c}/{name}" for name in names] for c, names in support.items()}, "query": query})
    path.write_text(json.dumps({"episodes": listed}))
    return path


def write_mini_omniglot(root: Path, data_dir: Path, alphabets: dict[str, list[str]], characters: int = 2, drawings: int = 2) -> Path:
    """<root>/omniglot/<archive>/<alphabet>/characterNN/<j>.png: real Omniglot drawings (distinct files) under the alphabets named per archive."""
    folder = root / "omniglot"
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as zf:
        pngs = iter(sorted(n for n in zf.namelist() if n.endswith(".png")))
        for archive, names in alphabets.items():
            for alphabet in names:
                for character in range(1, characters + 1):
                    for drawing in range(drawings):
                        target = folder / archive / alphabet / f"character{character:02d}" / f"{drawing}.png"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(next(pngs)))
    return folder
