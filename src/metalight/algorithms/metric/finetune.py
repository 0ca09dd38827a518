"""Test-time fine-tuning of a metric learner's body on a task's support set: the "F" of Hu et al. 2022 (P>M>F).

Hu et al. (hushell/pmf_cvpr22, models/deploy.py, ProtoNet_Finetune) copy the meta-trained backbone for each
task and take Adam steps on a pseudo-task made of the support set itself: prototypes from the support
images, pseudo-queries from augmented copies of them, cross-entropy of the pseudo-queries; then the queries
are scored with prototypes of the fine-tuned body. Their augmentation (models/utils.py, DiffAugment with
aug_prob 0.9 and aug_types colour and translation) leaves a step's pseudo-queries as they are with
probability 0.1; otherwise it mirrors the whole set left-right with probability 0.5, then jitters colour and
shifts each image. We do the same (`augment`: one draw per step for the set, one for the flip, one shift per
image, all from the task's generator) but leave out the colour jitter; the learner's own logits (ProtoNets:
negative squared distances) take the place of their cosine classifier. Their step count is 50 by the class
default (num_iters) and 40 by the command-line default (--ada_steps; their README's examples use 100); the
LR is chosen per domain on a few validation tasks among 0 (no fine-tuning), 1e-4, 1e-3 and 1e-2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalight.algorithms.optimization.functional import split_state

# (support embeddings [S, D], support labels [S], query embeddings [Q, D]) -> logits [Q, N]
Classifier = Callable[[Tensor, Tensor, Tensor], Tensor]
AUGMENT_PROB = 0.9  # ProtoNet_Finetune's aug_prob: the chance that a step's pseudo-queries are augmented at all
FLIP_PROB = 0.5  # DiffAugment's random_hflip: the chance that an augmented set is mirrored left-right


def translate(images: Tensor, generator: torch.Generator, ratio: float = 0.125) -> Tensor:
    """Each image [C, H, W] of `images` shifted by whole pixels, up to ratio of its side each way, the gap zero-filled."""
    height, width = images.shape[-2:]
    dy, dx = int(height * ratio + 0.5), int(width * ratio + 0.5)
    padded = F.pad(images, (dx, dx, dy, dy))
    shifts = [(int(torch.randint(-dy, dy + 1, (), generator=generator)), int(torch.randint(-dx, dx + 1, (), generator=generator))) for _ in images]
    return torch.stack([p[:, dy + sy : dy + sy + height, dx + sx : dx + sx + width] for p, (sy, sx) in zip(padded, shifts)])


def augment(images: Tensor, generator: torch.Generator, prob: float = AUGMENT_PROB, flip_prob: float = FLIP_PROB) -> Tensor:
    """Pseudo-queries from `images` [S, C, H, W] as Hu et al. make them, colour jitter aside.

    Unchanged with probability 1 - prob; otherwise the whole set mirrored left-right with probability
    flip_prob (one draw for the set, as DiffAugment's random_hflip), then each image translated.
    """
    if float(torch.rand((), generator=generator)) >= prob:
        return images
    if float(torch.rand((), generator=generator)) < flip_prob:
        images = images.flip(-1)
    return translate(images, generator)


def finetune_and_score(
    model: nn.Module, classify: Classifier, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int, lr: float, generator: torch.Generator
) -> Tensor:
    """Query logits [steps + 1, Q, N] of one task after each of `steps` Adam steps of the whole body on its support set.

    Step 0 is the body as meta-trained. The module's own weights are never changed: the steps act on a
    copy, through functional_call. Support and (pseudo-)queries are embedded as one batch, as ProtoNets'
    transductive evaluation does (with running BatchNorm statistics in eval mode, each image alone).
    """
    params, fixed = split_state(model)
    weights = {name: value.detach().clone().requires_grad_() for name, value in params.items()}
    optimizer = torch.optim.Adam(weights.values(), lr=lr)
    shots = len(support_x)

    def logits(queries: Tensor) -> Tensor:
        embedded = functional_call(model, (weights, fixed), (torch.cat([support_x, queries]),))
        return classify(embedded[:shots], support_y, embedded[shots:])

    recorded = []
    for step in range(steps + 1):
        with torch.no_grad():
            recorded.append(logits(query_x))
        if step < steps:
            optimizer.zero_grad()
            F.cross_entropy(logits(augment(support_x, generator)), support_y).backward()
            optimizer.step()
    return torch.stack(recorded)
