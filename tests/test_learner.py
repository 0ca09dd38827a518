"""FewShotLearner: a trained run applied to new images gives eval.py's logits, reads images as the DataModule does, and says what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metalight.data import FewShotDataModule
from metalight.data.episode_files import read_episodes
from metalight.data.preprocess import ImageFormat
from metalight.errors import CheckpointError, ConfigError
from metalight.apply.evaluation import restore_run_config
from metalight.apply.fixed_episodes import episode_batches, score_episodes
from metalight.apply.learner import FewShotLearner
from metalight.runs.checkpoints import load_weights, restore_input_format
from metalight.runs.training import build, train
from trained_runs import ALGORITHMS, IMAGE_SIZE, SHAPE, make_run, write_episodes, write_mini_omniglot, write_noise


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_noise(tmp_path_factory.mktemp("noise") / "images")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_predict_gives_the_logits_eval_py_scores_the_episode_with(compose_in, noise, tmp_path, one_thread, algo):
    run = make_run(compose_in, tmp_path / "train", noise, algo)
    episodes = write_episodes(noise / f"episodes_{algo}.json", noise, [{"class03": ["0.png"], "class07": ["2.png"]}])
    cfg = compose_in(tmp_path / "eval", f"ckpt_path={run}", f"episodes={episodes}", config_name="eval")
    checkpoint_path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    objects = build(restore_run_config(checkpoint_path, cfg, [f"episodes={episodes}"]))
    load_weights(objects["algorithm"], checkpoint, checkpoint_path)
    batches = episode_batches(read_episodes(episodes), restore_input_format(objects["datamodule"], checkpoint, checkpoint_path))
    _, (eval_logits,) = score_episodes(objects["algorithm"], objects["trainer"], batches)

    learner = FewShotLearner.load(run).adapt([noise / "class03" / "0.png", noise / "class07" / "2.png"], ["class03", "class07"])
    queries = [noise / c / f"{j}.png" for c, js in (("class03", (1, 2)), ("class07", (0, 1))) for j in js]
    logits = learner.logits(queries)
    assert logits.shape == (4, 2) and logits.std() > 0
    assert torch.equal(logits, eval_logits)
    assert torch.allclose(learner.predict(queries), eval_logits.softmax(-1)) and learner.classes == ["class03", "class07"]
    if algo in ("protonet", "baseline"):  # no fixed head: any number of ways; the body embeds
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
    by_file = learner.input_format(files)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    datamodule = FewShotDataModule(**{k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"})
    datamodule.setup()
    assert learner.input_format.mean == tuple(datamodule.mean) and learner.input_format.std == tuple(datamodule.std)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    yielded = torch.cat([batch["support_x"].flatten(0, 1), batch["query_x"].flatten(0, 1)])
    assert yielded.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    for image in yielded:  # every image of the tasks is exactly one file as the learner reads it
        assert sum(torch.equal(image, mine) for mine in by_file) == 1


def test_omniglot_files_are_inverted_resized_and_normalized_as_the_datamodule_does(data_dir, tmp_path, one_thread):
    root = write_mini_omniglot(tmp_path / "data", data_dir, {"images_background": ["Latin", "Balinese"], "images_evaluation": ["Angelic"]})
    options = dict(dataset="omniglot", root=str(root.parent), split="lake", image_size=28, n_way=2, k_shot=1, k_query=1,
                   mean=[0.1], std=[0.5], cache_dir=str(tmp_path / "cache"), eval_batch_size=1, n_test_tasks=1)
    datamodule = FewShotDataModule(**options)
    datamodule.setup()
    image_format = datamodule.input_format()
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
    assert learner.input_format.mean == tuple(saved["mean"]) and learner.input_format.std == tuple(saved["std"])
