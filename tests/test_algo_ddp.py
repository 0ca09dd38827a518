"""Two CPU processes (DDP over gloo) give every algorithm the same weights and metrics as one process.

Run as a script (`python tests/test_algo_ddp.py OUT_DIR`) it trains each algorithm with
Trainer(strategy="ddp", devices=2) and saves each rank's weights and validation metrics; the test
launches it, repeats the runs in one process on the union of the tasks, and compares. The text learner
(maml_text: MAML on model=text_bag over the frozen pretrained token table) draws its tasks from a
TextDataModule on a tiny CSV the test writes into OUT_DIR, each rank its share of every meta-step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from algo_tasks import TrainStream, end_distributed, fit_validate_save, launch_two_processes, make_batch, tiny_conv4, train_validate_save
from reptile_reference import reference_reptile
from trained_runs import write_utterances

from metalight.algorithms import ANIL, MAML, MAMLpp, MetaSGD, ProtoNet, Reptile
from metalight.algorithms.optimization.functional import minibatch_indices
from metalight.algorithms.optimization.reptile import task_generator

pytestmark = pytest.mark.usefixtures("one_thread")

# float64: the conv biases feed BatchNorms, so their gradients are rounding noise that Adam (Reptile's
# inner optimizer) scales up to full steps; in float32 that noise differs with the order of the cross-rank sum
STEPS = 2
META_BATCH = 4  # tasks per meta-step over all processes: 2 per rank with two ranks
ALGORITHMS = ("maml_loop", "maml_vmap", "reptile_fresh", "anil_loop", "metasgd_loop", "mamlpp_loop", "mamlpp_vmap", "protonet_loop")
# Reptile's persistent inner Adam: each rank carries it through its own tasks, then the ranks average it,
# so two processes are compared with reference_reptile(shares=2), not with one process
PER_RANK_RULE = ("reptile_persistent",)
ALGORITHMS += ("matchingnet_loop", "relationnet_loop")  # the metric-based learners of #24 (Matching Networks with FCE)
ALGORITHMS += ("snail_loop",)  # SNAIL (#34): the support order drawn per (seed, step, task) on each rank's share
ALGORITHMS += ("maml_text",)  # text tasks (#31): token ids from a TextDataModule, the token table frozen and never adapted
UTTERANCES = "utterances.csv"  # the text learner's data, written into OUT_DIR by the test


def text_data(out_dir: Path):
    """2-way 1-shot 2-query tasks of the tiny CSV (4 training classes), META_BATCH per meta-step, 5 validation tasks."""
    from metalight.text.datamodule import TextDataModule

    return TextDataModule(
        "text", str(out_dir / UTTERANCES), "ratios", n_way=2, k_shot=1, k_query=2, meta_batch_size=META_BATCH, eval_batch_size=2,
        batches_per_epoch=STEPS, n_val_tasks=5, source={"ratios": [0.5, 0.25, 0.25], "split_seed": 0}, cache_dir=str(out_dir / "cache"),
    )


def build(name: str):
    """The algorithm under test, identically initialized in every process."""
    if name.startswith(("matchingnet", "relationnet")):
        from metalight.algorithms import MatchingNet, RelationNet
        from metalight.models.conv4_relation import Conv4Relation

        if name.startswith("matchingnet"):
            return MatchingNet(tiny_conv4(seed=0, dtype=torch.float64), fce=True, task_parallel=name.partition("_")[2])
        torch.manual_seed(0)  # 8x8 images, one pool: 4x4 maps
        spatial = Conv4Relation(1, 3, hidden=4, image_size=8, padding=[1, 1, 1, 1], pool=[True, False, False, False]).to(torch.float64)
        return RelationNet(spatial, relation_channels=4, task_parallel=name.partition("_")[2])
    if name.startswith("snail"):
        from metalight.algorithms import SNAIL

        blocks = [["attention", 4, 3], ["tc", 3], ["attention", 4, 3]]
        return SNAIL(tiny_conv4(seed=0, dtype=torch.float64), n_way=3, k_shot=3, blocks=blocks, embedding=4, task_parallel="loop")
    if name.endswith("_text"):
        from metalight.text.encoders import TextBag

        torch.manual_seed(0)
        return MAML(TextBag(2, hidden=[8]).double(), inner_lr=0.3, inner_steps=2, eval_inner_steps=2, task_parallel="loop")
    model = tiny_conv4(seed=0, dtype=torch.float64)
    kind, _, path = name.partition("_")  # loop: per-task gradients + surrogate backward; vmap: the GPU path
    inner = dict(inner_lr=0.3, inner_steps=2, eval_inner_steps=2, task_parallel=path)
    if kind == "maml":
        return MAML(model, **inner)
    if kind == "anil":
        return ANIL(model, **inner)
    if kind == "metasgd":
        return MetaSGD(model, **inner)
    if kind == "mamlpp":  # MSL, LSLR, per-step BatchNorm weights and running statistics (averaged over ranks)
        return MAMLpp(model, **inner, msl_epochs=1, transductive=False)
    if kind == "protonet":
        return ProtoNet(model, task_parallel=path)
    return Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, meta_lr=0.5, meta_lr_final=0.1,
                   eval_inner_steps=2, eval_inner_lr=0.01, eval_inner_batch_size=4, seed=3, inner_state=path)


def run(name: str, devices: int, out_dir: Path) -> None:
    """Train STEPS meta-steps on META_BATCH tasks each, validate, save this rank's results."""
    if name.endswith("_text"):
        fit_validate_save(build(name), text_data(out_dir), STEPS, devices, out_dir / name)
        return
    train = TrainStream(STEPS, META_BATCH, k_shot=3, dtype=torch.float64)
    train_validate_save(build(name), train, STEPS, devices, str(out_dir / name))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    write_utterances(tmp_path / UTTERANCES)
    launch_two_processes(__file__, tmp_path)
    for name in ALGORITHMS:
        run(name, 1, tmp_path)

    for name in ALGORITHMS:
        single = torch.load(tmp_path / f"{name}-1-0.pt")
        ranks = [torch.load(tmp_path / f"{name}-2-{rank}.pt") for rank in (0, 1)]
        for key, value in single["params"].items():
            assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), f"{name}: ranks differ on {key}"
            torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-5, msg=f"{name}: {key}")
        assert set(ranks[0]["val"]) == set(single["val"]) and "val/acc" in single["val"]
        for key, value in single["val"].items():
            assert ranks[0]["val"][key] == ranks[1]["val"][key]
            assert ranks[0]["val"][key] == pytest.approx(value, abs=1e-5), f"{name}: {key}"
        start = build(name).state_dict()
        assert any(not torch.equal(start[k], v) for k, v in single["params"].items()), f"{name}: training moved nothing"

    for name in PER_RANK_RULE:
        ranks = [torch.load(tmp_path / f"{name}-2-{rank}.pt", weights_only=False) for rank in (0, 1)]
        algorithm = build(name)
        batches = [make_batch(META_BATCH, k_shot=3, seed=step, dtype=torch.float64) for step in range(STEPS)]

        def plans(step: int, task: int) -> torch.Tensor:
            return minibatch_indices(9, algorithm.train_loop, task_generator(3, "train", step, task))

        theta, adam = reference_reptile(algorithm.model, batches, plans, lr=0.01, eps=lambda step: 0.5 - 0.4 * step / STEPS, shares=2)
        states = [rank["inner_state"] for rank in ranks]
        assert states[0].step == states[1].step == int(adam["state"][0]["step"]) == STEPS * 2 * 3
        for i, (key, value) in enumerate(algorithm.model.named_parameters()):
            assert torch.equal(ranks[0]["params"][f"model.{key}"], ranks[1]["params"][f"model.{key}"]), f"{name}: ranks differ on {key}"
            assert torch.equal(states[0].v[key], states[1].v[key]), f"{name}: ranks hold different inner states for {key}"
            torch.testing.assert_close(ranks[0]["params"][f"model.{key}"], theta[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")
            torch.testing.assert_close(states[0].v[key], adam["state"][i]["exp_avg_sq"], rtol=1e-6, atol=1e-12, msg=f"{name}: {key}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for algorithm_name in ALGORITHMS + PER_RANK_RULE:
        run(algorithm_name, 2, Path(sys.argv[1]))
    end_distributed()
