"""Each algorithm of the family learns: a short run of its quick experiment beats the same learner untrained.

Both are measured here, on the same 100 Omniglot 5-way 1-shot test tasks: the learner evaluated without
training (train=false: the initial weights, adapted as evaluation adapts) and after STEPS meta-steps. A
zero, sign-flipped or otherwise broken meta-gradient leaves the trained learner near the untrained one.
(MAML's own bar is tests/test_experiments.py::test_quick_omniglot_learns_well_above_chance.)
"""

import pytest

from metalight.runs.training import train

STEPS = 60
# algorithm: the least gain in test accuracy STEPS steps must bring, about half of the gain measured on this
# project's 2-core CPU (untrained -> trained, in the comment)
MIN_GAIN = {
    "anil": 0.15,  # 0.260 -> 0.589
    "metasgd": 0.08,  # 0.508 -> 0.670 (8 tasks per meta-step)
    "mamlpp": 0.08,  # 0.372 -> 0.529 (16 filters, 4 tasks per meta-step)
    "protonet": 0.12,  # 0.555 -> 0.799 (20-way training tasks, inductive evaluation)
    "fomaml": 0.07,  # 0.508 -> 0.650
    "reptile": 0.09,  # 0.306 -> 0.484 (persistent inner Adam, 32 filters, 5 inner steps at test)
}
# cheaper than the quick experiment where learning still shows (measured: MAML++, Meta-SGD and Reptile each save a
# quarter to two fifths of their test's time): 20-way instead of 60-way ProtoNet episodes, fewer tasks per meta-step,
# fewer filters, fewer inner steps at test
CHEAPER = {
    "protonet": ["data.n_way_train=20"],
    "reptile": ["algo.eval_inner_steps=5", "model.hidden=32"],
    "metasgd": ["data.meta_batch_size=8"],
    "mamlpp": ["model.hidden=16", "data.meta_batch_size=4"],
}


def short_run(compose_train, algo: str, *overrides: str) -> dict[str, float]:
    """STEPS meta-steps (two epochs) of experiment=quick_omniglot_<algo>, then its test on 100 tasks; the test metrics."""
    cfg = compose_train(
        f"experiment=quick_omniglot_{algo}", f"trainer.max_steps={STEPS}", f"data.batches_per_epoch={STEPS // 2}",
        "data.n_val_tasks=16", "data.n_test_tasks=100", "logger=csv", "callbacks.val_task_image=null",
        "callbacks.accuracy_charts=null", "callbacks.model_summary=null", *overrides,
    )
    metrics, _ = train(cfg)
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(MIN_GAIN))
def test_a_short_run_beats_the_untrained_learner(compose_train, one_thread, algo):
    untrained = short_run(compose_train, algo, "train=false", *CHEAPER.get(algo, []))["test/acc"]
    trained = short_run(compose_train, algo, *CHEAPER.get(algo, []))["test/acc"]
    print(f"{algo}: untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained > untrained + MIN_GAIN[algo], f"{algo}: {untrained:.3f} untrained, {trained:.3f} after {STEPS} steps"
