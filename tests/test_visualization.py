"""TensorBoard views and task pictures: the validation task image in the event file, grid layout, predictions, event reading."""

from pathlib import Path

import pytest
import torch
from algo_tasks import make_batch, tiny_conv4
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metalight.algorithms import MAML, Reptile
from metalight.runs.training import train
from metalight.visualization import inner_step_accuracy, query_predictions, read_scalars, task_grid
from metalight.visualization.images import RIGHT, SUPPORT, WRONG

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_run_logs_the_validation_task_image(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(
        "algo=maml", "model=conv4_strided", "trainer.max_steps=2", "data.batches_per_epoch=1", "data.meta_batch_size=2",
        "data.n_val_tasks=2", "data.eval_batch_size=2", "data.n_test_tasks=2",
    )
    train(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Images("val_task/episode")
    scalars = read_scalars(tmp_path / "run")
    assert len(scalars["val/acc"]["step"]) == 2
    assert [image.step for image in images] == scalars["val/acc"]["step"]  # one per validation, beside its val/acc
    # 5 rows (classes) x [1 support | gap | 15 query] tiles of 28 + 4 * 2 (two 2-pixel frames) + 2 padding
    tile = 28 + 4 * 2 + 2
    assert (images[-1].width, images[-1].height) == (17 * tile + 2, 5 * tile + 2)
    assert "val_task/legend/text_summary" in events.Tags()["tensors"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]

    curve = inner_step_accuracy(scalars, "val")
    assert len(curve) == cfg.algo.eval_inner_steps + 1 and curve[-1] == scalars["val/acc"]["value"][-1]
    assert len(inner_step_accuracy(scalars, "test")) == cfg.algo.eval_inner_steps + 1


def test_task_grid_rows_per_class_and_frame_colors() -> None:
    n_way, k_shot, k_query, size = 3, 2, 4, 28
    task = {k: v[0] for k, v in make_batch(1, n_way, k_shot, k_query, size=size).items()}
    before = task["query_y"].clone()
    after = (task["query_y"] + 1) % n_way  # every query image wrong after adaptation
    grid = task_grid(task, [0.5], [0.25], before, after)
    width, tile = 2, size + 8 + 2
    assert grid.shape == (3, n_way * tile + width, (k_shot + 1 + k_query) * tile + width)

    def pixel(row: int, column: int, ring: int) -> tuple[float, ...]:
        """Color of tile (row, column) at `ring` pixels inside its top-left corner."""
        return tuple(round(float(v), 2) for v in grid[:, width + row * tile + ring, width + column * tile + ring])

    assert pixel(0, 0, 0) == pytest.approx(SUPPORT, abs=0.01)
    first_query = k_shot + 1
    assert pixel(n_way - 1, first_query, 0) == pytest.approx(RIGHT, abs=0.01)  # outer frame: before
    assert pixel(n_way - 1, first_query, width) == pytest.approx(WRONG, abs=0.01)  # inner frame: after


def test_task_grid_needs_equal_class_sizes() -> None:
    task = {k: v[0] for k, v in make_batch(1, 3, 2, 2).items()}
    task["query_y"] = torch.tensor([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"query set has \[3, 2, 1\] examples per class"):
        task_grid(task, [0.0], [1.0])


@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("algorithm_class", [MAML, Reptile])
def test_predictions_give_the_accuracy_evaluation_reports(algorithm_class, transductive: bool, task_parallel: str) -> None:
    batch = make_batch(3, n_way=3, k_shot=2, k_query=3, size=8, seed=1)
    options = dict(transductive=transductive, task_parallel=task_parallel)
    if algorithm_class is MAML:
        algorithm = MAML(tiny_conv4(), inner_lr=0.5, eval_inner_steps=2, **options)
    else:
        algorithm = Reptile(tiny_conv4(), inner_lr=0.05, eval_inner_steps=3, eval_inner_batch_size=2, **options)
    before, after = query_predictions(algorithm, batch, stream="val", task_ids=[0, 1, 2])
    assert before.shape == after.shape == batch["query_y"].shape
    loop = algorithm.eval_loop
    indices = algorithm.task_indices(batch, loop, "val", [0, 1, 2])
    params = {k: v.detach() for k, v in algorithm.model.named_parameters()}
    reported = algorithm.adapt(batch, loop, params, indices, record="ends", transductive=transductive).scores
    mine = torch.stack([(p == batch["query_y"]).float().mean(dim=1) for p in (before, after)], dim=1)
    assert torch.allclose(mine, reported.float())


def test_read_scalars_names_a_folder_without_events(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_scalars(tmp_path)
