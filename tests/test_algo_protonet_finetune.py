"""ProtoNets fine-tuned at test time (algo.finetune_steps, P>M>F's "F"): starts from the plain prototypes, fits the support set, leaves the weights."""

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import make_batch, tiny_conv4

from metalight.algorithms import ProtoNet
from metalight.algorithms.finetune import finetune_and_score, translate
from metalight.algorithms.protonet import negative_squared_distances, prototypes
from metalight.algorithms.reptile import task_generator
from metalight.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS, STEPS = 3, 4


def test_step_zero_is_plain_protonets_and_the_weights_stay_untouched():
    batch = make_batch(TASKS, n_way=3, k_shot=2, k_query=3)
    tuned = ProtoNet(tiny_conv4(n_way=3, hidden=6), finetune_steps=STEPS, finetune_lr=0.05, seed=1).eval()
    plain = ProtoNet(tiny_conv4(n_way=3, hidden=6)).eval()
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    outcome = tuned.evaluate_tasks(batch, "test", list(range(TASKS)), keep_logits=True)
    reference = plain.evaluate_tasks(batch, "test", list(range(TASKS)), keep_logits=True)
    assert outcome.accs.shape == (TASKS, STEPS + 1) and outcome.logits.shape == (TASKS, STEPS + 1, 9, 3)
    torch.testing.assert_close(outcome.logits[:, 0], reference.logits[:, 0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outcome.logits[:, -1], outcome.logits[:, 0]), "fine-tuning changed no prediction"
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items()), "evaluation changed the meta-trained weights"
    assert tuned.eval_steps == STEPS and plain.eval_steps is None


def test_steps_lower_the_support_loss_and_follow_the_seed():
    batch = make_batch(1, n_way=3, k_shot=3, k_query=2, seed=4)  # classes differ in mean brightness: BatchNorm-free body
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh())
    sx, sy = batch["support_x"][0], batch["support_y"][0]

    def classify(support, labels, queries):
        return negative_squared_distances(queries, prototypes(support, labels, 3))

    def run(seed):
        return finetune_and_score(model, classify, sx, sy, sx, 10, 0.01, task_generator(seed, "test", 0, 0))

    logits = run(0)  # the queries are the support images themselves: the loss the steps descend, without the shifts
    losses = [float(F.cross_entropy(step, sy)) for step in logits]
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(logits, run(0)) and not torch.equal(logits, run(1))


def test_translation_shifts_whole_images_by_at_most_an_eighth():
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16) + 1
    shifted = translate(images, torch.Generator().manual_seed(0))
    for original, moved in zip(images, shifted):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved[:, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)],
                                original[:, max(0, dy) : 16 - max(0, -dy), max(0, dx) : 16 - max(0, -dx)])]
        assert len(found) == 1 and int((moved == 0).sum()) == 16 * 16 - (16 - abs(found[0][0])) * (16 - abs(found[0][1]))


def test_bad_finetune_keys_name_the_key():
    with pytest.raises(ConfigError, match="algo.finetune_steps=-1"):
        ProtoNet(tiny_conv4(), finetune_steps=-1)
    with pytest.raises(ConfigError, match="algo.finetune_lr=0"):
        ProtoNet(tiny_conv4(), finetune_lr=0)
