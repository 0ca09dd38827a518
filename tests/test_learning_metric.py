"""Matching and Relation Networks learn: a short run of their quick experiment, with 16-filter networks, beats the
same learner untrained, both measured here on the same 100 Omniglot 5-way 1-shot test tasks.

The untrained learner (train=false: the initial weights) and the trained one are scored on the same tasks; a zero,
sign-flipped or otherwise broken gradient (attention, labels, pairs out of order) leaves the trained one near it.
"""

import pytest

from metalight.runs.training import train

STEPS = 60
# the least gain in test accuracy STEPS steps must bring, about half of the gain measured on this project's 2-core
# CPU (untrained -> trained, in the comment)
MIN_GAIN = {
    "matchingnet": 0.11,  # 0.410 -> 0.643
    "relationnet": 0.15,  # 0.199 -> 0.500 (untrained, every score is about the same: chance)
}


def short_run(compose_train, algo: str, *overrides: str) -> float:
    """test/acc after STEPS steps of experiment=quick_omniglot_<algo> with 16 filters, on 100 test tasks."""
    cfg = compose_train(
        f"experiment=quick_omniglot_{algo}", f"trainer.max_steps={STEPS}", f"data.batches_per_epoch={STEPS}",
        "model.hidden=16", "data.n_val_tasks=8", "data.n_test_tasks=100", "logger=csv", "callbacks.val_task_image=null",
        "callbacks.accuracy_charts=null", "callbacks.model_summary=null", *overrides,
    )
    metrics, _ = train(cfg)
    return metrics["test/acc"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(MIN_GAIN))
def test_a_short_run_beats_the_untrained_learner(compose_train, one_thread, algo):
    untrained = short_run(compose_train, algo, "train=false")
    trained = short_run(compose_train, algo)
    print(f"{algo}: untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained > untrained + MIN_GAIN[algo], f"{algo}: {untrained:.3f} untrained, {trained:.3f} after {STEPS} steps"
