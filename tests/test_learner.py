"""FewShotLearner: a trained run applied to new images gives eval.py's logits, reads images as the DataModule does, and says what is wrong."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from metalight.data import FewShotDataModule
from metalight.data.episode_files import read_episodes
from metalight.errors import CheckpointError, ConfigError, DataError
from metalight.evaluation import evaluate, restore_run_config
from metalight.fixed_episodes import episode_batches, score_episodes
from metalight.learner import FewShotLearner
from metalight.runs import load_weights, restore_image_format
from metalight.training import build, build_data_and_algorithm, train

ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "protonet")
CLASSES, PER_CLASS, FILE_SIZE, IMAGE_SIZE = 12, 3, 12, 8  # noise images 12x12, read at 8x8 (resized)
SHAPE = (
    f"data.image_size={IMAGE_SIZE}", "data.n_way=2", "data.k_shot=1", "data.k_query=2", "data.source.ratios=[0.5,0.25,0.25]",
    "data.meta_batch_size=2", "data.eval_batch_size=2", "data.n_val_tasks=2", "data.n_test_tasks=2", "data.batches_per_epoch=1",
    "model=conv4_strided", "model.hidden=4",
)


def quick(algo: str) -> tuple[str, ...]:
    """Overrides that make `algo` cheap to evaluate (two evaluation inner steps)."""
    return (f"algo={algo}",) if algo == "protonet" else (f"algo={algo}", "algo.eval_inner_steps=2")


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLASSES class folders of PER_CLASS random RGB images, each FILE_SIZE pixels square."""
    root = tmp_path_factory.mktemp("noise") / "images"
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
        for j in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (FILE_SIZE, FILE_SIZE, 3), dtype=np.uint8)).save(root / f"class{c:02d}" / f"{j}.png")
    return root


def make_run(compose_in, folder: Path, images: Path, algo: str) -> Path:
    """A run folder as train.py leaves it (.hydra/config.yaml, checkpoints/last.ckpt with the data's mean/std), untrained weights."""
    cfg = compose_in(folder, "data=folder", f"data.root={images}", *SHAPE, *quick(algo))
    run = folder / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    datamodule, algorithm = build_data_and_algorithm(cfg)
    datamodule.setup()
    (run / "checkpoints").mkdir()
    checkpoint = {"state_dict": algorithm.state_dict(), "hyper_parameters": dict(algorithm.hparams), "FewShotDataModule": datamodule.state_dict()}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    return run


def write_episodes(path: Path, images: Path, episodes: list[dict[str, list[str]]]) -> Path:
    """A JSON episodes file: each episode {class: [support file names]} + the other files of those classes as queries."""
    listed = []
    for support in episodes:
        query = {c: [f"{c}/{f.name}" for f in sorted((images / c).iterdir()) if f.name not in names] for c, names in support.items()}
        listed.append({"support": {c: [f"{c}/{name}" for name in names] for c, names in support.items()}, "query": query})
    path.write_text(json.dumps({"episodes": listed}))
    return path


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_predict_gives_the_logits_eval_py_scores_the_episode_with(compose_in, noise, tmp_path, one_thread, algo):
    run = make_run(compose_in, tmp_path / "train", noise, algo)
    episodes = write_episodes(noise / f"episodes_{algo}.json", noise, [{"class03": ["0.png"], "class07": ["2.png"]}])
    cfg = compose_in(tmp_path / "eval", f"ckpt_path={run}", f"episodes={episodes}", config_name="eval")
    checkpoint_path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    objects = build(restore_run_config(checkpoint_path, cfg, [f"episodes={episodes}"]))
    load_weights(objects["algorithm"], checkpoint, checkpoint_path)
    batches = episode_batches(read_episodes(episodes), restore_image_format(objects["datamodule"], checkpoint, checkpoint_path))
    _, (eval_logits,) = score_episodes(objects["algorithm"], objects["trainer"], batches)

    learner = FewShotLearner.load(run).adapt([noise / "class03" / "0.png", noise / "class07" / "2.png"], ["class03", "class07"])
    queries = [noise / c / f"{j}.png" for c, js in (("class03", (1, 2)), ("class07", (0, 1))) for j in js]
    logits = learner.logits(queries)
    assert logits.shape == (4, 2) and logits.std() > 0
    assert torch.equal(logits, eval_logits)
    assert torch.allclose(learner.predict(queries), eval_logits.softmax(-1)) and learner.classes == ["class03", "class07"]
    if algo == "protonet":  # no fixed head: any number of ways; the body embeds
        three = learner.adapt([noise / f"class0{c}" / "0.png" for c in range(3)], ["a", "b", "c"]).predict(queries)
        assert three.shape == (4, 3) and torch.allclose(three.sum(-1), torch.ones(4))
        assert learner.embed(queries).shape == (4, 4)
    else:
        with pytest.raises(ConfigError, match=r"scores exactly 2 classes .* support set has 3: give it 2 classes"):
            learner.adapt([noise / f"class0{c}" / "0.png" for c in range(3)], ["a", "b", "c"])


def test_a_file_through_the_learner_is_the_tensor_the_datamodule_yields(compose_in, noise, tmp_path, one_thread):
    run = make_run(compose_in, tmp_path / "train", noise, "protonet")
    learner = FewShotLearner.load(run)
    files = sorted(noise.glob("*/*.png"))
    by_file = learner.image_format(files)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    datamodule = FewShotDataModule(**{k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"})
    datamodule.setup()
    assert learner.image_format.mean == tuple(datamodule.mean) and learner.image_format.std == tuple(datamodule.std)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    yielded = torch.cat([batch["support_x"].flatten(0, 1), batch["query_x"].flatten(0, 1)])
    assert yielded.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    for image in yielded:  # every image of the tasks is exactly one file as the learner reads it
        assert sum(torch.equal(image, mine) for mine in by_file) == 1


def test_omniglot_files_are_inverted_resized_and_normalized_as_the_datamodule_does(data_dir, tmp_path, one_thread):
    from metalight.data.preprocess import ImageFormat

    root = tmp_path / "data" / "omniglot"
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as zf:
        pngs = sorted(n for n in zf.namelist() if n.endswith(".png"))[:12]
        for i, (archive, alphabet) in enumerate((("images_background", "Latin"), ("images_background", "Balinese"), ("images_evaluation", "Angelic"))):
            for character in range(2):
                for drawing in range(2):
                    target = root / archive / alphabet / f"character0{character + 1}" / f"{drawing}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(pngs[4 * i + 2 * character + drawing]))
    options = dict(dataset="omniglot", root=str(root.parent), split="lake", image_size=28, n_way=2, k_shot=1, k_query=1,
                   mean=[0.1], std=[0.5], cache_dir=str(tmp_path / "cache"), eval_batch_size=1, n_test_tasks=1)
    datamodule = FewShotDataModule(**options)
    datamodule.setup()
    image_format = datamodule.image_format()
    assert image_format == ImageFormat(28, 1, True, (0.1,), (0.5,))
    files = sorted((root / "images_evaluation").glob("*/*/*.png"))
    by_file = image_format(files)
    assert by_file.amin() == pytest.approx(-0.2) and by_file.amax() > 1.0  # inverted: the white background is 0, (0 - 0.1) / 0.5
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    yielded = torch.cat([batch["support_x"].flatten(0, 1), batch["query_x"].flatten(0, 1)])
    assert sorted(next(i for i, mine in enumerate(by_file) if torch.equal(image, mine)) for image in yielded) == [0, 1, 2, 3]
    pil = Image.open(files[0])
    assert torch.equal(image_format([pil])[0], by_file[0])  # a PIL image
    assert torch.equal(image_format([torch.from_numpy(np.array(pil.convert("L")))])[0], by_file[0])  # a tensor


def test_a_run_saves_its_mean_and_std_and_the_learner_uses_them_without_the_data(compose_train, noise, tmp_path, one_thread):
    import shutil

    images = shutil.copytree(noise, tmp_path / "images")
    cfg = compose_train("data=folder", f"data.root={images}", *SHAPE, "algo=protonet", "trainer.max_steps=1", "logger=csv", "test=false")
    _, objects = train(cfg)
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["FewShotDataModule"]
    assert saved == {"mean": objects["datamodule"].mean, "std": objects["datamodule"].std} and len(saved["mean"]) == 3
    shutil.rmtree(images)  # nothing left to compute them from
    run = Path(cfg.paths.output_dir)
    with pytest.raises(CheckpointError, match=r"\.hydra/config\.yaml is missing: .* copy the folder's \.hydra/ with it"):
        FewShotLearner.load(run)  # a run folder without its config (train() outside Hydra writes none)
    (run / ".hydra").mkdir()
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run / ".hydra" / "config.yaml")
    learner = FewShotLearner.load(run)
    assert learner.image_format.mean == tuple(saved["mean"]) and learner.image_format.std == tuple(saved["std"])
