"""EpisodicModule: the LightningModule every meta-learner shares (outer step, evaluation, metrics, logging).

A subclass says how one meta-batch turns into meta-gradients (`compute_meta_gradient`) and, for
learners that adapt by gradient steps, which inner loops it uses (`train_loop`, `eval_loop`) and with
which options (`inner_options`: adapted weights, learned step sizes, ...). A learner without an inner
loop (ProtoNets) overrides `evaluate_tasks` instead. This class owns the rest:

* the outer step under manual optimization: non-finite meta-losses or meta-gradients skip the step
  with a warning, `max_nonfinite_steps` in a row abort the run; optional gradient-norm clipping;
  LR scheduler stepped once per outer step;
* validation/test: `evaluate_tasks` scores each task's query set (for an inner-loop learner: adapt from
  the meta-parameters on the support set with gradients on, the Trainer running with
  inference_mode=False, and score after every inner step), sums over tasks locally and reduces the
  sums across ranks once per epoch;
* the train/*, val/*, test/* metrics and `test_results` for eval.py, named after the task kind's
  metric (val/acc for classification, val/mse for regression: `task_kind`, see tasks/kinds.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from metalight.algorithms.optimization.functional import (
    InnerLoop,
    TaskOutcome,
    TaskPath,
    loop_meta_gradient,
    make_task_fn,
    resolve_task_parallel,
    run_tasks,
    split_state,
)
from metalight.errors import ConfigError, MetalightError
from metalight.tasks.kinds import CLASSIFICATION, KINDS, TaskKind

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class NonFiniteMetaStepError(MetalightError):
    """Too many meta-steps in a row had a non-finite meta-loss or meta-gradient."""


def require_features_and_head(model: nn.Module, algorithm: str) -> None:
    """ConfigError unless `model` has a separable head: `features` (images -> embeddings) and `head` modules."""
    if not all(isinstance(getattr(model, part, None), nn.Module) for part in ("features", "head")):
        raise ConfigError(
            f"{algorithm} needs a model with a separable head (a `features` module mapping images to embeddings and a "
            f"`head` module, forward = head(features(x))), but {type(model).__name__} has none: use model=conv4, "
            "conv4_strided, conv4_mini, resnet12 or timm, or give your network those two submodules."
        )


def outcome_of_logits(logits: Tensor, query_y: Tensor, keep_logits: bool = False) -> TaskOutcome:
    """The TaskOutcome of query logits recorded after every step, [B, P, Q, N]: accuracies [B, P], loss [B] at the last step."""
    accs = (logits.argmax(-1) == query_y.unsqueeze(1)).to(logits.dtype).mean(-1)
    loss = F.cross_entropy(logits[:, -1].flatten(0, 1), query_y.flatten(), reduction="none").view(len(query_y), -1).mean(1)
    return TaskOutcome(loss, accs, {}, logits if keep_logits else logits.new_zeros(0))


def mean_and_ci95(total: float, total_sq: float, n: int) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96 * std / sqrt(n) (sample std) from a sum and a sum of squares."""
    mean = total / n
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


# what the refusal of a task kind suggests instead
LEARNERS_OF_KIND = {
    "regression": "a gradient-based learner (algo=maml, fomaml, reptile, anil, metasgd, mamlpp, pretrained) or algo=cnp",
    "classification": "any learner but algo=cnp",
    "reinforcement": "algo=maml_rl (or fomaml_rl, maml_ppo, rl2)",
}


class EpisodicModule(pl.LightningModule):
    """Base LightningModule of episodic meta-learners: outer step, evaluation by adaptation, metrics."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an instantiated torch.nn.Module, got {type(model).__name__}: check conf/model/.")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ConfigError(f"gradient_clip_val={gradient_clip_val!r} is not valid: use a number > 0, or null for no clipping.")
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps={max_nonfinite_steps!r} is not valid: use a whole number >= 1.")
        resolve_task_parallel(task_parallel, torch.device("cpu"), model)  # validates the name early
        self.automatic_optimization = False
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.gradient_clip_val = gradient_clip_val
        self.task_parallel = task_parallel
        self.max_nonfinite_steps = max_nonfinite_steps
        self.transductive = transductive
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.test_results: dict[str, Any] = {}
        # eval.py's checkpoint ensembling: (final query logits, query labels) of each test batch, in task order
        self.keep_test_logits = False
        self.test_outputs: list[tuple[Tensor, Tensor]] = []
        self._eval_sums: Tensor | None = None
        self._eval_points = 1  # scores per task: the inner steps + 1 when it adapts
        self._eval_seen = 0
        self._last_step_start: float | None = None
        # the task interface: loss and metric of the tasks this learner meets (set from the data module)
        self.task_kind: TaskKind = CLASSIFICATION

    # ---- what a subclass provides -------------------------------------------------------------
    # the inner loop used while meta-training, and the one of validation and test (never builds a
    # graph through its steps); a learner that adapts sets both in its __init__, one without an inner
    # loop leaves them None
    train_loop: InnerLoop | None = None
    eval_loop: InnerLoop | None = None
    # what training batches hold, data.train_mode: "episodes" (meta-batches of tasks) or "flat" (labelled images)
    train_mode = "episodes"
    # the throughput metric: meta-batches count tasks; a learner trained on images counts images
    throughput_metric = "train/tasks_per_s"
    # the kinds of task (tasks/kinds.py) this learner can take: a gradient-based learner takes any
    # loss; one built around class prototypes or classifier heads lists "classification" alone
    task_kinds: tuple[str, ...] = tuple(KINDS)

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Leave the meta-gradient (synced across ranks) in .grad; with measure, score the query set before and after."""
        raise NotImplementedError

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Options of make_task_fn this learner adapts with (adapted weights, learned step sizes, ...); none by default.

        training: for a meta-training step (learned tensors keep their graph) or for evaluation (detached).
        """
        return {}

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The outer optimizer when the config names none."""
        raise NotImplementedError

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The LR scheduler stepped after every outer step (None: constant LR)."""
        return self.scheduler_factory(optimizer) if self.scheduler_factory is not None else None

    def task_indices(self, batch: dict[str, Tensor], loop: InnerLoop, stream: str, task_ids: list[int]) -> Tensor | None:
        """Support-set minibatch indices [B, steps, batch] for the tasks numbered task_ids, or None (full batch)."""
        return None

    # ---- shared machinery ---------------------------------------------------------------------
    @classmethod
    def check_task_kind(cls, kind: TaskKind) -> None:
        """ConfigError, naming the fix, when this learner cannot take tasks of `kind` (a classifier on regression tasks)."""
        if kind.name not in cls.task_kinds:
            learners = LEARNERS_OF_KIND.get(kind.name, "another learner")
            raise ConfigError(
                f"algo={cls.__name__} learns {' and '.join(cls.task_kinds)} tasks only, but the data (data=...) gives "
                f"{kind.name} tasks: choose {learners}, or a data set of its kind."
            )

    def use_task_kind(self, kind: TaskKind) -> None:
        """Learn tasks of `kind` (its loss, its metric); ConfigError when this learner cannot take them."""
        self.check_task_kind(kind)
        self.task_kind = kind

    def setup(self, stage: str) -> None:
        """Take the task kind of the attached data module (a Trainer given a data module built by hand, too)."""
        kind = getattr(self._trainer.datamodule, "kind", None) if self._trainer is not None else None
        if isinstance(kind, TaskKind):
            self.use_task_kind(kind)

    @property
    def metric(self) -> str:
        """The name of the task kind's metric in logs and results: acc (classification) or mse (regression)."""
        return self.task_kind.metric

    @property
    def eval_steps(self) -> int | None:
        """Steps evaluation adapts by (scores then has eval_steps + 1 columns, step 0 = before), None when it does not adapt by steps."""
        return self.eval_loop.steps if self.eval_loop is not None else None

    @property
    def adapts(self) -> bool:
        """Whether this learner adapts by steps at evaluation (its evaluation then has per-step accuracies)."""
        return self.eval_steps is not None

    def batch_size_of(self, batch: dict[str, Tensor]) -> int:
        """What a training batch holds, in the unit of throughput_metric (tasks of a meta-batch)."""
        return batch["support_x"].shape[0]

    def tasks_in(self, batch: dict[str, Tensor]) -> int:
        """Tasks in a validation or test batch (their support sets; an RL learner counts task parameters)."""
        return batch["support_x"].shape[0]

    def path(self) -> TaskPath:
        """vmap or loop for this module's device and model (see functional.resolve_task_parallel)."""
        return resolve_task_parallel(self.task_parallel, self.device, self.model)

    def adapt(
        self, batch: dict[str, Tensor], loop: InnerLoop, params: dict[str, Tensor], indices: Tensor | None, training: bool = False, **options: Any
    ) -> TaskOutcome:
        """Adapt every task of `batch` from `params` with `loop` and this learner's inner_options; options go to make_task_fn."""
        _, fixed = split_state(self.model)
        path = self.path()
        task_fn = make_task_fn(self.model, fixed, loop, path, kind=self.task_kind, **self.inner_options(training), **options)
        return run_tasks(task_fn, params, batch, indices, path, second_order=not loop.first_order)

    def meta_backward(
        self, task_fn: Callable[..., TaskOutcome], params: dict[str, Tensor], batch: dict[str, Tensor], second_order: bool, extra: dict[str, Tensor] | None = None
    ) -> TaskOutcome:
        """Backpropagate the meta-batch's mean query loss through manual_backward (DDP averages it); return the outcomes.

        vmap: one backward through all tasks. loop: each task differentiated as soon as it is adapted (one
        task's graph alive at a time), then a surrogate linear in the meta-parameters, whose gradient is
        exactly that meta-gradient, goes through manual_backward. `extra`: tensors task_fn uses by closure
        that are meta-parameters too (learned step sizes).
        """
        path = self.path()
        if path == "vmap":
            outcome = run_tasks(task_fn, params, batch, None, path, second_order=second_order)
            self.manual_backward(outcome.loss.mean())
            return outcome
        extra = extra or {}
        outcome, grads, extra_grads = loop_meta_gradient(task_fn, params, batch, extra)
        surrogate = sum((p * grads[k]).sum() for k, p in params.items())
        self.manual_backward(surrogate + sum((e * extra_grads[k]).sum() for k, e in extra.items()))
        return outcome

    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Score the query sets of a batch of val/test tasks: scores [B, P] (P = eval_loop.steps + 1, step 0 = before adaptation).

        The tasks are adapted from the meta-parameters with the evaluation loop, exactly as validation
        and test do; task_ids number them within `stream` (they seed Reptile's minibatches).
        keep_logits: also return the query outputs at every step, [B, P, Q, ...].
        """
        indices = self.task_indices(batch, self.eval_loop, stream, task_ids)
        params = {k: v.detach() for k, v in split_state(self.model)[0].items()}
        with torch.enable_grad():
            return self.adapt(batch, self.eval_loop, params, indices, record="every_step", transductive=self.transductive, keep_logits=keep_logits)

    def weights_adapted_to(self, support_x: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """Each task's weights [B, ...] after the evaluation inner loop on its support set (support_x [B, n, ...]), detached.

        What a deployed learner predicts with once it has seen a task's support set: GrBAL's model adapted every
        control step to the last transitions. Weights the inner loop does not adapt keep their meta-values.
        """
        if self.eval_loop is None:
            raise ConfigError(f"algo={type(self).__name__} adapts without gradient steps, so it has no adapted weights: use a gradient-based learner (maml, fomaml, metasgd, anil, pretrained).")
        params = {k: v.detach() for k, v in split_state(self.model)[0].items()}
        batch = {"support_x": support_x, "support_y": support_y, "query_x": support_x[:, :1], "query_y": support_y[:, :1]}
        with torch.enable_grad():
            outcome = self.adapt(batch, self.eval_loop, params, None, return_params=True, record="none")
        return {k: v.detach() for k, v in outcome.params.items()}

    def configure_optimizers(self) -> Any:
        """The outer optimizer over the trainable parameters (learned step sizes too), with its scheduler stepped per meta-step."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params) if self.optimizer_factory is not None else self.default_optimizer(params)
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def world_size(self) -> int:
        """Processes sharing each meta-batch (1 without a trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One meta-step: meta-gradient, finite check, clipping, outer optimizer and scheduler step, logging."""
        start = time.perf_counter()
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        outer_lr = float(optimizer.param_groups[0]["lr"])  # the LR this step uses, before the scheduler moves it
        measure = self._logging_this_step()
        outcome = self.compute_meta_gradient(batch, measure)

        # one small collective per step: a NaN loss on any rank makes the mean NaN everywhere, so every
        # rank takes the same skip decision (the gradient norm is the same everywhere after DDP's sync)
        local = [outcome.loss.detach().mean()]
        if measure:
            local += [outcome.scores[:, -1].mean(), outcome.scores[:, 0].mean()]
        reduced = self.trainer.strategy.reduce(torch.stack(local).float(), reduce_op="mean")
        loss = reduced[0]
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else loss.new_zeros(())
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self._skip_step(float(loss), float(grad_norm))
        else:
            self.nonfinite_streak = 0
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()

        batch_size = self.batch_size_of(batch)
        metrics = {"train/grad_norm": grad_norm, "train/outer_lr": outer_lr, "train/nonfinite_steps": float(self.nonfinite_total)}
        if measure and self.train_loop is not None:
            metrics["train/inner_lr"] = self.mean_inner_lr()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        if self._last_step_start is not None:  # throughput between consecutive step starts (data time included)
            per_s = batch_size * self.world_size / max(start - self._last_step_start, 1e-9)
            self.log(self.throughput_metric, per_s, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self._last_step_start = start
        if measure:
            if self.train_loop is not None:
                self.log(f"train/{self.metric}_before", reduced[2], on_step=True, on_epoch=False, batch_size=batch_size)
            self.log_dict({"train/loss": loss, f"train/{self.metric}": reduced[1]}, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)

    def mean_inner_lr(self) -> float:
        """train/inner_lr: the configured inner step size, or the mean of the learned ones (Meta-SGD, MAML++ LSLR)."""
        sizes = self.inner_options(training=False).get("step_sizes")
        if sizes:
            return float(torch.cat([s.flatten() for s in sizes.values()]).mean())
        return float(self.train_loop.lr)

    def _logging_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics (log_every_n_steps): query accuracies are measured only then."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _skip_step(self, loss: float, grad_norm: float) -> None:
        """Count a non-finite meta-step, warn, and abort after max_nonfinite_steps in a row."""
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteMetaStepError(
                f"{self.nonfinite_streak} meta-steps in a row had a non-finite meta-loss or meta-gradient "
                f"(last: loss={loss}, gradient norm={grad_norm}), at global step {self.global_step}. Training stopped; "
                "the last checkpoint saved before this point is intact. Lower the outer learning rate "
                "(algo.optimizer.lr) or algo.inner_lr, or set algo.gradient_clip_val, then resume or restart."
            )
        rank_zero_warn(
            f"Skipped meta-step at global step {self.global_step}: non-finite meta-loss ({loss}) or meta-gradient "
            f"norm ({grad_norm}); {self.nonfinite_streak} in a row, {self.nonfinite_total} in total "
            f"(the run stops after algo.max_nonfinite_steps={self.max_nonfinite_steps} in a row)."
        )

    def on_fit_start(self) -> None:
        """Refuse training tasks whose number of ways differs from what the model's linear head scores."""
        head = getattr(self.model, "head", None)
        ways = getattr(self._trainer.datamodule if self._trainer is not None else None, "n_way_train", None)
        if isinstance(head, nn.Linear) and isinstance(ways, int) and ways != head.out_features:
            raise ConfigError(
                f"training tasks are {ways}-way (data.n_way_train) but the model's head has {head.out_features} outputs "
                f"(data.n_way): only algo=protonet trains with other ways than it tests; set data.n_way_train=null."
            )

    def on_train_epoch_start(self) -> None:
        """Do not count the pause for validation as training time in train/tasks_per_s."""
        self._last_step_start = None

    # ---- evaluation ---------------------------------------------------------------------------
    def _start_eval(self) -> None:
        """Zero the per-epoch sums: count, loss, then the score at each inner step (or once), then its square at each."""
        self._eval_points = self.eval_steps + 1 if self.adapts else 1
        self._eval_sums = torch.zeros(2 + 2 * self._eval_points, dtype=torch.float64, device=self.device)
        self._eval_seen = 0
        self.test_outputs = []

    def _eval_step(self, batch: dict[str, Tensor], stream: str) -> None:
        """Adapt every task of the batch from the meta-parameters, score the query set at each step, add to the sums."""
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "evaluation adapts with gradients, which inference mode forbids: build the Trainer with "
                "inference_mode=False (trainer.inference_mode=false)."
            )
        if self._eval_sums is None:
            self._start_eval()
        # eval tasks are dealt round-robin (rank r holds tasks r, r+W, ...): number them globally
        n_tasks = self.tasks_in(batch)
        task_ids = [(self._eval_seen + j) * self.world_size + self.global_rank for j in range(n_tasks)]
        keep = stream == "test" and self.keep_test_logits
        outcome = self.evaluate_tasks(batch, stream, task_ids, keep_logits=keep)
        if keep:
            self.test_outputs.append((outcome.logits[:, -1].detach().cpu(), batch["query_y"].cpu()))
        scores = outcome.scores.detach().double()
        head = torch.stack([scores.new_tensor(float(len(scores))), outcome.loss.detach().double().sum()])
        self._eval_sums += torch.cat([head, scores.sum(dim=0), (scores**2).sum(dim=0)])
        self._eval_seen += len(scores)

    def _finish_eval(self, stage: str) -> dict[str, Any]:
        """Reduce the sums over ranks (one collective), log stage/* metrics, return them as plain numbers.

        Every reported step has its interval (metric_steps_ci95, logged as stage/<metric>_step<k>_ci95), so a
        comparison at step 1 is judged by step 1's interval, not the last step's."""
        if self._eval_sums is None:
            self._start_eval()
        sums = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        self._eval_sums = None
        n = int(sums[0])
        if n == 0:
            return {}
        metric, points = self.metric, self._eval_points
        steps = [mean_and_ci95(total, total_sq, n) for total, total_sq in zip(sums[2 : 2 + points], sums[2 + points :])]
        score, score_ci95 = steps[-1]
        results: dict[str, Any] = {metric: score, f"{metric}_ci95": score_ci95, "loss": sums[1] / n, "n_tasks": n}
        if self.adapts:
            results |= {
                f"{metric}_before": steps[0][0],
                f"{metric}_before_ci95": steps[0][1],
                f"{metric}_steps": [mean for mean, _ in steps],
                f"{metric}_steps_ci95": [ci95 for _, ci95 in steps],
            }
        per_step = (f"{metric}_steps", f"{metric}_steps_ci95")
        logged = {f"{stage}/{k}": v for k, v in results.items() if k not in (metric, "n_tasks", *per_step)}
        logged.update({f"{stage}/{metric}_step{k}": v for k, v in enumerate(results.get(per_step[0], []))})
        logged.update({f"{stage}/{metric}_step{k}_ci95": v for k, v in enumerate(results.get(per_step[1], []))})
        # identical on every rank already (reduced above); sync_dist averages equal values, so it only
        # keeps Lightning from warning about unsynced epoch-level metrics under DDP
        self.log_dict(logged, sync_dist=True)
        self.log(f"{stage}/{metric}", score, prog_bar=True, sync_dist=True)
        return results

    def on_validation_epoch_start(self) -> None:
        """Zero the validation sums."""
        self._start_eval()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Adapt and score one batch of validation tasks."""
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log val/acc (checkpoint monitor; val/mse for regression), val/acc_ci95, val/acc_before, val/loss, val/acc_step{k}."""
        self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        """Zero the test sums."""
        self._start_eval()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Adapt and score one batch of test tasks."""
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Log test/* and keep them in `test_results` (acc, acc_ci95, loss, n_tasks; acc_before, acc_steps, acc_steps_ci95 when it adapts; mse_* for regression)."""
        self.test_results = self._finish_eval("test")

    # ---- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the non-finite step counters with the weights."""
        checkpoint["nonfinite"] = {"streak": self.nonfinite_streak, "total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the non-finite step counters."""
        counters = checkpoint.get("nonfinite", {})
        self.nonfinite_streak = counters.get("streak", 0)
        self.nonfinite_total = counters.get("total", 0)
