"""ProtoNets fine-tuned at test time (algo.finetune_steps, P>M>F's "F"): starts from the plain prototypes, fits the support set, leaves the weights,
augments the pseudo-queries as Hu et al. do."""

import pytest
import torch
import torch.nn.functional as F
from algo_tasks import make_batch, tiny_conv4

from metalight.algorithms import ProtoNet
from metalight.algorithms.metric.finetune import augment, finetune_and_score, translate
from metalight.algorithms.metric.protonet import negative_squared_distances, prototypes
from metalight.algorithms.optimization.reptile import task_generator
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
    assert outcome.scores.shape == (TASKS, STEPS + 1) and outcome.logits.shape == (TASKS, STEPS + 1, 9, 3)
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


def _moves(original: torch.Tensor, moved: torch.Tensor, most: int) -> list[tuple[bool, int, int]]:
    """Every (mirrored, dy, dx) under which `moved` [C, H, W] is `original` shifted by (dy, dx), the gap zero-filled."""
    side = original.shape[-1]
    found = []
    for mirrored, source in ((False, original), (True, original.flip(-1))):
        for dy in range(-most, most + 1):
            for dx in range(-most, most + 1):
                shifted = torch.zeros_like(source)
                shifted[:, max(0, dy) : side + min(0, dy), max(0, dx) : side + min(0, dx)] = source[:, max(0, -dy) : side - max(0, dy), max(0, -dx) : side - max(0, dx)]
                if torch.equal(moved, shifted):
                    found.append((mirrored, dy, dx))
    return found


def test_pseudo_queries_are_augmented_nine_times_in_ten_and_mirrored_half_of_those():
    """Hu et al.'s DiffAugment(aug_prob=0.9): unchanged 1 time in 10, else the whole set mirrored with p 0.5, each image shifted."""
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    generator = torch.Generator().manual_seed(0)
    draws, unchanged, mirrored = 1000, 0, 0
    for _ in range(draws):
        out = augment(images, generator)
        moves = [_moves(original, moved, most=1) for original, moved in zip(images, out)]  # an eighth of 8 pixels: 1
        assert all(len(m) == 1 for m in moves), moves  # every image is its original, shifted or mirrored and shifted
        assert moves[0][0][0] == moves[1][0][0], "the two images of one set were mirrored differently"
        unchanged += torch.equal(out, images)
        mirrored += moves[0][0][0]
    # unchanged: 0.1, plus 0.45 / 81 when neither image of an unmirrored set moved; mirrored: 0.9 x 0.5
    assert abs(unchanged / draws - 0.1) < 0.03 and abs(mirrored / draws - 0.45) < 0.05, (unchanged, mirrored)
    first, again = augment(images, torch.Generator().manual_seed(3)), augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    never = torch.Generator().manual_seed(0)
    assert all(torch.equal(augment(images, never, prob=0.0), images) for _ in range(20))
    always = torch.Generator().manual_seed(0)
    assert all(_moves(images[0], augment(images, always, prob=1.0, flip_prob=1.0)[0], most=1)[0][0] for _ in range(20))


def test_every_step_scores_augmented_pseudo_queries(monkeypatch):
    import metalight.algorithms.metric.finetune as finetune

    seen = []
    monkeypatch.setattr(finetune, "augment", lambda images, generator: seen.append(images) or images.flip(-1))
    batch = make_batch(1, n_way=3, k_shot=2, k_query=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    classify = lambda support, labels, queries: negative_squared_distances(queries, prototypes(support, labels, 3))  # noqa: E731
    finetune.finetune_and_score(model, classify, batch["support_x"][0], batch["support_y"][0], batch["query_x"][0], 3, 0.01, torch.Generator())
    assert len(seen) == 3 and all(torch.equal(images, batch["support_x"][0]) for images in seen)


def test_bad_finetune_keys_name_the_key():
    with pytest.raises(ConfigError, match="algo.finetune_steps=-1"):
        ProtoNet(tiny_conv4(), finetune_steps=-1)
    with pytest.raises(ConfigError, match="algo.finetune_lr=0"):
        ProtoNet(tiny_conv4(), finetune_lr=0)
