"""Each algorithm of the family learns: a short run of its quick experiment clears a bar an untrained learner cannot.

The bars sit between two measured test accuracies on the same 100 Omniglot 5-way 1-shot test tasks: the
learner evaluated without training (train=false: the initial weights, adapted as evaluation adapts) and
after STEPS meta-steps. A zero, sign-flipped or otherwise broken meta-gradient leaves a learner near the
first number. (MAML's own bar is tests/test_experiments.py::test_quick_omniglot_learns_well_above_chance.)
"""

import pytest

from metalight.training import train

STEPS = 60
# algorithm: (untrained, trained after STEPS steps, bar), measured on this project's 2-core CPU; the bar
# sits about halfway
MEASURED = {
    "anil": (0.260, 0.589, 0.45),
    "metasgd": (0.508, 0.681, 0.60),
    "mamlpp": (0.483, 0.651, 0.57),
    "protonet": (0.572, 0.910, 0.75),
}


def short_run(compose_train, algo: str) -> dict[str, float]:
    """STEPS meta-steps (two epochs) of experiment=quick_omniglot_<algo>, then its test on 100 tasks; the test metrics."""
    cfg = compose_train(
        f"experiment=quick_omniglot_{algo}", f"trainer.max_steps={STEPS}", f"data.batches_per_epoch={STEPS // 2}",
        "data.n_val_tasks=16", "data.n_test_tasks=100", "logger=csv", "callbacks.val_task_image=null",
        "callbacks.accuracy_charts=null", "callbacks.model_summary=null",
    )
    metrics, _ = train(cfg)
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(MEASURED))
def test_a_short_run_clears_the_bar_an_untrained_learner_fails(compose_train, one_thread, algo):
    untrained, trained, bar = MEASURED[algo]
    assert untrained < bar < trained  # the bar separates the two measured runs
    metrics = short_run(compose_train, algo)
    assert metrics["test/acc"] > bar, f"{algo}: {metrics['test/acc']:.3f} after {STEPS} steps (measured {trained:.3f}; untrained {untrained:.3f})"
