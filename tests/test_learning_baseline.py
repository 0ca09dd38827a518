"""Baseline++ learns: a short pretraining beats the same network untrained, both measured here on the same test tasks.

Both runs are experiment=quick_omniglot_baselinepp scored on the same 100 Omniglot 5-way 1-shot test tasks
with a cosine head fitted per task: once with the initial weights (train=false), once after STEPS steps of
pretraining on labelled images. Random conv features already separate some characters, so the untrained
accuracy is well above chance; a broken pretraining (no step, a wrong sign, labels not matching the images)
leaves the trained run there.
"""

import pytest

from metalight.runs.training import train

STEPS = 60
MARGIN = 0.05  # paired on the same tasks: far above the noise of two fits of the same body


def run(compose_train, *overrides: str) -> float:
    """test/acc of quick_omniglot_baselinepp shrunk to STEPS steps and 100 test tasks."""
    cfg = compose_train(
        "experiment=quick_omniglot_baselinepp", f"trainer.max_steps={STEPS}", f"data.batches_per_epoch={STEPS}",
        "data.n_val_tasks=8", "data.n_test_tasks=100", "logger=csv", "callbacks.val_task_image=null",
        "callbacks.accuracy_charts=null", "callbacks.model_summary=null", *overrides,
    )
    metrics, _ = train(cfg)
    return metrics["test/acc"]


@pytest.mark.slow
def test_a_short_pretraining_beats_the_untrained_body(compose_train, one_thread):
    untrained = run(compose_train, "train=false")
    trained = run(compose_train)
    assert trained > untrained + MARGIN, f"after {STEPS} steps {trained:.3f}, untrained {untrained:.3f}"
