"""Task sampling and samplers on a synthetic split: labels, determinism, rank sharding, resumption."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metalight.data import EpisodeDataset, EvalTaskSampler, TrainTaskSampler
from metalight.data.episodes import SPLIT_CODES

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


def _dense_formula(images: np.ndarray, seed: int, split: str, epoch: int, index: int, n_way: int, k: int) -> np.ndarray:
    """The draw of a dense [classes, per_class, ...] split before ragged storage: [n_way, k, ...] images of one task."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], epoch, index])
    classes = rng.choice(images.shape[0], n_way, replace=False)
    samples = rng.random((n_way, images.shape[1])).argsort(axis=1)[:, :k]
    return images[classes[:, None], samples]


def _assert_dense_formula(dataset: EpisodeDataset, dense: np.ndarray, keys: list[tuple[int, int]]) -> None:
    batch = dataset[keys]
    k, n_way = dataset.k_shot + dataset.k_query, dataset.n_way
    for b, (epoch, index) in enumerate(keys):
        expected = _dense_formula(dense, dataset.seed, dataset.split, epoch, index, n_way, k)
        support = batch["support_x"][b].reshape(n_way, dataset.k_shot, *dense.shape[2:]).numpy()
        query = batch["query_x"][b].reshape(n_way, dataset.k_query, *dense.shape[2:]).numpy()
        assert np.array_equal(support, expected[:, : dataset.k_shot]) and np.array_equal(query, expected[:, dataset.k_shot :])


def test_equal_counts_draw_exactly_the_dense_formula() -> None:
    dense = _coded_images()
    flat = dense.reshape(-1, *dense.shape[2:])
    starts, counts = np.arange(CLASSES) * PER_CLASS, np.full(CLASSES, PER_CLASS)
    for split, seed in (("train", 3), ("test", 0)):
        dataset = EpisodeDataset(flat, split, seed, 5, 2, 3, starts, counts)
        _assert_dense_formula(dataset, dense, [(e, i) for e in (0, 4) for i in (0, 1, 999)])


def test_real_omniglot_and_miniimagenet_tasks_are_unchanged(data_dir: Path, cache_dir: Path) -> None:
    from metalight.data.miniimagenet import load_part
    from metalight.data.omniglot import load_omniglot

    splits = [("train", load_omniglot(data_dir, "vinyals", 28, cache_dir)["train"], 20, 7)]
    if (data_dir / "miniimagenet").is_dir():
        splits.append(("val", load_part(data_dir, "val", 84, cache_dir), 5, 0))
    for part, split, n_way, seed in splits:
        per_class = int(split.counts[0])
        dense = np.asarray(split.images).reshape(len(split.classes), per_class, *split.images.shape[1:])
        dataset = EpisodeDataset(split.images, part, seed, n_way, 1, 15, split.starts, split.counts)
        _assert_dense_formula(dataset, dense, [(0, 0), (2, 17), (5, 12345)])


def test_ragged_classes() -> None:
    counts = np.array([3, 7, 4, 20, 5])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    images = np.zeros((counts.sum(), 1, 4, 4), np.uint8)
    for c, (start, count) in enumerate(zip(starts, counts)):
        images[start : start + count, 0, 0, 0] = c
        images[start : start + count, 0, 0, 1] = np.arange(count)
    dataset = EpisodeDataset(images, "train", 0, 3, 1, 2, starts, counts)
    assert dataset.per_class == 20 and dataset.ragged
    seen: dict[int, set[int]] = {c: set() for c in range(5)}
    batch = dataset[[(0, i) for i in range(400)]]
    x = torch.cat([batch["support_x"], batch["query_x"]], dim=1)[..., 0, 0, :2].numpy()
    for task in x:
        for c, j in task:
            seen[int(c)].add(int(j))
        assert len({(int(c), int(j)) for c, j in task}) == len(task), "distinct images"
    assert all(seen[c] == set(range(counts[c])) for c in range(5)), "every image of each class reachable, none past its count"
    with pytest.raises(ValueError, match="cannot give 3-way tasks of 2 \\+ 2 images"):
        EpisodeDataset(images, "train", 0, 3, 2, 2, starts, counts)
