"""Task sampling and samplers on a synthetic split: labels, determinism, rank sharding, resumption."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metalight.data import EpisodeDataset, EvalTaskSampler, TrainTaskSampler

CLASSES, PER_CLASS = 300, 20


def _coded_images() -> np.ndarray:
    """[300, 20, 1, 4, 4] uint8 whose pixels (0,0), (0,1), (0,2) spell class // 256, class % 256 and sample."""
    images = np.zeros((CLASSES, PER_CLASS, 1, 4, 4), np.uint8)
    c, s = np.meshgrid(np.arange(CLASSES), np.arange(PER_CLASS), indexing="ij")
    images[..., 0, 0, 0], images[..., 0, 0, 1], images[..., 0, 0, 2] = c // 256, c % 256, s
    return images


def _decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(class, sample) of each image in [..., 1, 4, 4]."""
    pixels = x[..., 0, 0, :3].numpy().astype(int)
    return pixels[..., 0] * 256 + pixels[..., 1], pixels[..., 2]


def _dataset(seed: int = 0, split: str = "train", n_way: int = 5, k_shot: int = 2, k_query: int = 3) -> EpisodeDataset:
    return EpisodeDataset(_coded_images(), split, seed, n_way, k_shot, k_query)


def test_batch_layout_and_label_remapping() -> None:
    batch = _dataset()[[(0, i) for i in range(8)]]
    assert batch["support_x"].shape == (8, 10, 1, 4, 4) and batch["query_x"].shape == (8, 15, 1, 4, 4)
    assert batch["support_x"].dtype == torch.uint8 and batch["support_y"].dtype == torch.int64
    assert batch["support_y"][0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch["query_y"][0].tolist() == [c for c in range(5) for _ in range(3)]
    support_class, support_sample = _decode(batch["support_x"])
    query_class, query_sample = _decode(batch["query_x"])
    for b in range(8):
        classes = support_class[b, ::2]
        assert len(set(classes.tolist())) == 5, "classes drawn without replacement"
        assert (support_class[b] == classes[batch["support_y"][b].numpy()]).all(), "label = position of the class"
        assert (query_class[b] == classes[batch["query_y"][b].numpy()]).all()
        for way in range(5):
            samples = [*support_sample[b, 2 * way : 2 * way + 2], *query_sample[b, 3 * way : 3 * way + 3]]
            assert len(set(samples)) == 5, "support and query images of a class are distinct"


def test_tasks_are_a_function_of_seed_split_epoch_index() -> None:
    one, same = _dataset(seed=1), _dataset(seed=1)
    batch = one[[(3, 7), (3, 8)]]
    alone = same[[(3, 8)]]
    assert torch.equal(batch["query_x"][1], alone["query_x"][0]), "a task does not depend on its batch mates"
    assert torch.equal(one[[(3, 7)]]["support_x"], same[[(3, 7)]]["support_x"])
    others = [_dataset(seed=2)[[(3, 7)]], one[[(4, 7)]], one[[(3, 9)]], _dataset(seed=1, split="val")[[(3, 7)]]]
    for other in others:
        assert not torch.equal(other["query_x"], alone["query_x"])


def test_memory_mapped_dataset_pickles_by_name(tmp_path: Path) -> None:
    np.save(tmp_path / "split.npy", _coded_images())
    dataset = EpisodeDataset(np.load(tmp_path / "split.npy", mmap_mode="r"), "train", 0, 5, 1, 2)
    payload = pickle.dumps(dataset)
    assert len(payload) < 10_000
    assert torch.equal(pickle.loads(payload)[[(0, 1)]]["query_x"], dataset[[(0, 1)]]["query_x"])


def _keys(sampler) -> list[list[tuple[int, int]]]:
    return [list(batch) for batch in sampler]


def test_train_sampler_shards_meta_steps_over_ranks() -> None:
    single = _keys(TrainTaskSampler(8, 5))
    ranks = [_keys(TrainTaskSampler(8, 5, rank=r, world_size=4)) for r in range(4)]
    assert len(single) == 5 and all(len(r) == 5 for r in ranks)
    for step in range(5):
        assert single[step] == [(0, i) for i in range(8 * step, 8 * step + 8)]
        assert sum((r[step] for r in ranks), []) == single[step], "rank r takes the r-th contiguous slice"
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], [])), "no two ranks draw the same task"
    data = _dataset()
    assert not torch.equal(data[ranks[0][0]]["support_x"], data[ranks[1][0]]["support_x"])


def test_train_sampler_epochs_and_resume() -> None:
    sampler = TrainTaskSampler(4, 3, epoch=2, start=1)
    assert len(sampler) == 3, "Lightning counts the skipped steps itself"
    assert _keys(sampler) == [[(2, i) for i in range(4 * s, 4 * s + 4)] for s in (1, 2)]
    sampler.set_epoch(2)
    assert len(_keys(sampler)) == 2, "setting the same epoch keeps the resume point"
    sampler.set_epoch(3)
    assert _keys(sampler) == [[(3, i) for i in range(4 * s, 4 * s + 4)] for s in range(3)]


def test_meta_batch_must_split_over_ranks() -> None:
    with pytest.raises(ValueError, match="multiple of world_size"):
        TrainTaskSampler(6, 3, rank=0, world_size=4)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_eval_tasks_identical_for_any_world_size(world: int) -> None:
    single = sum(_keys(EvalTaskSampler(50, 8)), [])
    assert single == [(0, i) for i in range(50)]
    shards = [sum(_keys(EvalTaskSampler(50, 8, r, world)), []) for r in range(world)]
    assert sorted(sum(shards, [])) == single, "no duplicates, no gaps"
    assert all(i % world == r for r, shard in enumerate(shards) for _, i in shard)
    assert all(len(batch) <= 8 for r in range(world) for batch in EvalTaskSampler(50, 8, r, world))
    data = _dataset(split="test")
    whole = data[single]["support_x"]
    for r, shard in enumerate(shards):
        assert torch.equal(data[shard]["support_x"], whole[r::world])
