"""FewShotLearner: a trained run applied to your own task: adapt to a few labelled examples, then predict new ones.

    learner = FewShotLearner.load("logs/train/runs/<time>")     # a run folder, a .ckpt file, or "last"
    learner.adapt(support_images, support_labels)                # paths, PIL images or tensors; any hashable labels
    probs = learner.predict(query_images)                        # [n_queries, n_classes], columns in learner.classes order

A text run (data=banking77, data=text, ...) takes lists of strings the same way:
`learner.adapt(["card got declined", "where is my card"], ["declined", "delivery"]).predict(["my card was refused"])`.

A regression run (data=sinusoid, ...) takes tensors: `learner.adapt(x, y)` with x [K, input_dim] (or [K])
and y [K, output_dim] (or [K]), then `learner.predict(x_new)` gives the adapted predictions [n, output_dim].

Inputs go through the run's input format, restored from its checkpoint: images are read exactly as the run read
its own (data/preprocess.py: size, channels, Omniglot's inversion, and the mean/std its checkpoint saved), texts
are tokenized by its tokenizer and cut at its data.max_tokens (text/datamodule.py TextFormat). Scoring goes through the algorithm's own `evaluate_tasks`, as
eval.py's does: an inner-loop learner fine-tunes a copy of its meta-parameters with its evaluation loop, a
ProtoNet builds prototypes, and the logits are those eval.py gets for the same episode. The meta-parameters
never change.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule
from metalight.runs.checkpoints import load_checkpoint, load_weights, resolve_checkpoint, restore_input_format, saved_run_config
from metalight.data.episode_files import task_batch
from metalight.data.preprocess import ImageInput, InputFormat
from metalight.errors import ConfigError
from metalight.runs.training import build_data_and_algorithm


Input = ImageInput | str  # an image (file, PIL image, tensor) or, for a text run, an utterance


class FewShotLearner:
    """A trained meta-learner and its run's input format, as a classifier of classes given by a support set (module docstring)."""

    def __init__(self, algorithm: EpisodicModule, input_format: InputFormat | None, checkpoint: Path, config: DictConfig, modality: str = "images") -> None:
        self.algorithm, self.input_format, self.checkpoint, self.config = algorithm, input_format, checkpoint, config
        self.modality = modality  # what the run's data fed its model: images or text (regression runs: their own tensors)
        self.classes: list[Hashable] = []
        self._support: tuple[Tensor, Tensor] | None = None

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "cpu", runs_dir: Path = Path("logs/train/runs")) -> FewShotLearner:
        """The learner a run trained: `run` is its folder (last.ckpt), a checkpoint inside its checkpoints/, or "last" (newest under runs_dir)."""
        path = resolve_checkpoint(run, runs_dir)
        checkpoint = load_checkpoint(path)
        config = saved_run_config(path)
        datamodule, algorithm = build_data_and_algorithm(config)
        load_weights(algorithm, checkpoint, path)
        classifies = algorithm.task_kind.name == "classification"
        input_format = restore_input_format(datamodule, checkpoint, path) if classifies else None
        return cls(algorithm.to(device).eval(), input_format, path, config, getattr(datamodule, "modality", "tensors"))

    @property
    def regresses(self) -> bool:
        """Whether the run learned regression tasks (tensors in, predictions out) rather than classes of images or texts."""
        return self.algorithm.task_kind.name == "regression"

    @property
    def name(self) -> str:
        """The algorithm's class name (MAML, ProtoNet, ...), for messages."""
        return type(self.algorithm).__name__

    def fixed_ways(self) -> int | None:
        """How many classes the model's linear head scores (MAML family, Reptile); None when it has none (ProtoNets, Baseline: any number)."""
        head = getattr(self.algorithm.model, "head", None)
        return head.out_features if isinstance(head, nn.Linear) else None

    def adapt(self, inputs: Sequence[Input] | Tensor, labels: Sequence[Hashable] | Tensor) -> FewShotLearner:
        """Take the support set: images (a text run: utterances) and their labels (class names or numbers), classes in order of first appearance.

        For a regression run: inputs x [K, input_dim] and targets y [K, output_dim] (1-D tensors are one column).

        The adaptation itself runs with every predict() (so it sees the queries as evaluation does:
        BatchNorm's statistics are transductive unless algo.transductive=false). ConfigError when a
        learner with a fixed number of outputs gets another number of classes.
        """
        what = "utterances" if self.modality == "text" else "images"
        if isinstance(inputs, str) or len(inputs) != len(labels) or not len(inputs):
            got = "one string" if isinstance(inputs, str) else f"{len(inputs)} {what}"
            raise ConfigError(f"adapt() got {got} and {len(labels)} labels: give a list of {what} and one label each, at least one.")
        if self.regresses:
            self._support = (self._column_tensor(inputs, "data.input_dim", "x"), self._column_tensor(labels, "data.output_dim", "y"))
            return self
        classes = list(dict.fromkeys(labels))
        ways = self.fixed_ways()
        if ways is not None and ways != len(classes):
            raise ConfigError(
                f"this {self.name} learner scores exactly {ways} classes (its run's data.n_way), but the support set has "
                f"{len(classes)}: give it {ways} classes, or use a learner without a fixed head (algo=protonet)."
            )
        index = {label: c for c, label in enumerate(classes)}
        self.classes = classes
        self._support = (self.input_format(inputs), torch.tensor([index[label] for label in labels]))
        return self

    def _column_tensor(self, values: Tensor | Sequence[float], key: str, name: str) -> Tensor:
        """Regression inputs or targets as float32 [n, width], width checked against the run's data.input_dim / output_dim."""
        tensor = torch.as_tensor(values, dtype=torch.float32)
        tensor = tensor.unsqueeze(-1) if tensor.dim() == 1 else tensor
        width = self.config.data.get(key.removeprefix("data."))
        if tensor.dim() != 2 or tensor.shape[1] != width:
            raise ConfigError(f"{name} has shape {list(tensor.shape)} but this run's tasks have {key}={width}: give [n, {width}] (or [n] for 1).")
        return tensor

    def logits(self, inputs: Sequence[Input], task_id: int = 0) -> Tensor:
        """Query logits [n, n_classes] after adapting to the support set, from the algorithm's evaluate_tasks.

        task_id seeds what evaluation draws per task (Reptile's support minibatches); eval.py numbers its
        episodes 0, 1, ...
        """
        if self._support is None:
            raise ConfigError("predict() needs a support set first: call adapt(support_images, support_labels).")
        if isinstance(inputs, str) or not len(inputs):
            what = "utterances" if self.modality == "text" else "images"
            raise ConfigError(f"predict() got {'one string' if isinstance(inputs, str) else 'no query ' + what}: give a list of {what}, at least one.")
        support_x, support_y = self._support
        if self.regresses:
            query_x = self._column_tensor(inputs, "data.input_dim", "x")
            batch = {"support_x": support_x[None], "support_y": support_y[None], "query_x": query_x[None], "query_y": query_x.new_zeros(1, len(query_x), support_y.shape[1])}
        else:
            query_x = self.input_format(inputs)
            batch = task_batch(support_x, support_y, query_x, torch.zeros(len(query_x), dtype=torch.long))
        device = self.algorithm.device
        outcome = self.algorithm.evaluate_tasks({k: v.to(device) for k, v in batch.items()}, "test", [task_id], keep_logits=True)
        return outcome.logits[0, -1].cpu()

    def predict(self, inputs: Sequence[Input] | Tensor) -> Tensor:
        """Class probabilities [n, n_classes] of query images or utterances (softmax of logits()), columns in `classes` order; a regression run's predictions [n, output_dim]."""
        outputs = self.logits(inputs)
        return outputs if self.regresses else outputs.softmax(dim=-1)

    def embed(self, inputs: Sequence[Input]) -> Tensor:
        """Embeddings [n, D] of images or utterances by the meta-trained body (model.features), for a model with a separable head."""
        features = getattr(self.algorithm.model, "features", None)
        if not isinstance(features, nn.Module):
            raise ConfigError(f"embed() needs a model with a separable body (`features`); this run's {type(self.algorithm.model).__name__} has none.")
        with torch.no_grad():
            return features(self.input_format(inputs).to(self.algorithm.device)).cpu()
