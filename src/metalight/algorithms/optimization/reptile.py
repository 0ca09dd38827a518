"""Reptile (Nichol et al. 2018): theta <- theta + eps * mean_i(phi_i - theta), eps annealed linearly."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule, OptimizerFactory
from metalight.algorithms.optimization.functional import (
    InnerLoop,
    InnerState,
    TaskOutcome,
    inner_weights,
    make_task_fn,
    minibatch_indices,
    run_tasks_carrying_state,
    split_state,
)
from metalight.errors import ConfigError

_STREAMS = {"train": 0, "val": 1, "test": 2}
INNER_STATES = ("persistent", "fresh")


def task_generator(seed: int, stream: str, step: int, task: int) -> torch.Generator:
    """The generator of one task's minibatches: a pure function of (seed, train/val/test, outer step, task number)."""
    return torch.Generator().manual_seed(hash((seed, _STREAMS[stream], step, task)) & 0x7FFF_FFFF_FFFF_FFFF)


class LinearAnneal:
    """LambdaLR factor taking the LR linearly from its initial value to `final_ratio` times it over `total_steps`."""

    def __init__(self, final_ratio: float, total_steps: int) -> None:
        self.final_ratio = final_ratio
        self.total_steps = max(int(total_steps), 1)

    def __call__(self, step: int) -> float:
        """Multiplier of the initial LR after `step` outer steps."""
        done = min(step / self.total_steps, 1.0)
        return 1.0 + (self.final_ratio - 1.0) * done


class Reptile(EpisodicModule):
    """Reptile: adapt each task with a few first-order steps, move the meta-parameters toward the results.

    Each task takes `inner_steps` steps of SGD or Adam (betas `inner_betas`, beta1 = 0 as in the
    paper) on minibatches of `inner_batch_size` support examples. The
    meta-update is an outer optimizer step on the pseudo-gradient theta - mean_i(phi_i), averaged
    across DDP ranks explicitly. The outer optimizer defaults to SGD, whose LR is eps: it goes from
    `meta_lr` to `meta_lr_final` linearly over the run's outer steps (Trainer.max_steps, or its
    estimate from max_epochs). An Adam outer optimizer gets the same schedule on its LR. Evaluation
    fine-tunes from theta with `eval_inner_steps` steps of `eval_inner_lr` on minibatches of
    `eval_inner_batch_size` (null: the whole support set). Minibatches are drawn from a generator
    seeded by (seed, split, step, task number), so they do not depend on the number of processes.

    The inner Adam's state (`inner_state`): "persistent", as openai/supervised-reptile runs it, keeps
    its moments and step count for the whole run (only the weights are reset to theta for each task)
    and saves them in checkpoints; every validation and test task starts from a copy of it that is
    never written back. "fresh" starts every task from zero moments and step 0 (an ablation). With a
    persistent state the loop path (the CPU default) carries it through a meta-batch's tasks one after
    another, as the original does; the vmap path starts every task of the meta-batch from the same
    state and carries the mean of their final moments (step count + inner_steps); under DDP each rank
    carries it through its own tasks in order and the ranks' moments are averaged once per meta-step,
    so every rank holds the same state.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: str = "adam",
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_batch_size: int | None = 10,
        meta_lr: float = 1.0,
        meta_lr_final: float = 0.0,
        eval_inner_steps: int = 50,
        eval_inner_lr: float | None = None,
        eval_inner_batch_size: int | None = None,
        inner_betas: tuple[float, float] = (0.0, 0.999),
        optimizer: OptimizerFactory | None = None,
        gradient_clip_val: float | None = None,
        task_parallel: str = "auto",
        max_nonfinite_steps: int = 10,
        transductive: bool = True,
        seed: int = 0,
        inner_state: str = "persistent",
    ) -> None:
        super().__init__(model, optimizer, None, gradient_clip_val, task_parallel, max_nonfinite_steps, transductive)
        if inner_state not in INNER_STATES:
            raise ConfigError(f"algo.inner_state={inner_state!r} is not known: use persistent (the authors' code) or fresh.")
        if inner_state == "persistent" and inner_optimizer != "adam":
            raise ConfigError(
                f"algo.inner_state=persistent keeps the inner optimizer's moments, but algo.inner_optimizer={inner_optimizer!r} "
                "has none: use algo.inner_state=fresh with sgd, or algo.inner_optimizer=adam."
            )
        if not meta_lr > 0 or meta_lr_final < 0:
            raise ConfigError(
                f"meta_lr={meta_lr!r}, meta_lr_final={meta_lr_final!r} are not valid: eps must start > 0 and end >= 0 "
                "(the paper anneals 1.0 -> 0.0)."
            )
        inner_betas = (float(inner_betas[0]), float(inner_betas[1]))  # a plain tuple in the checkpoint, not a ListConfig
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.train_loop = InnerLoop(inner_steps, inner_lr, inner_optimizer, inner_batch_size, inner_betas)
        self.eval_loop = InnerLoop(
            eval_inner_steps, inner_lr if eval_inner_lr is None else eval_inner_lr, inner_optimizer, eval_inner_batch_size, inner_betas
        )
        self.meta_lr, self.meta_lr_final, self.seed = meta_lr, meta_lr_final, seed
        self.inner_state = inner_state
        # the weights each task moves (a text encoder's token table is kept out: theta - phi is 0 there, so Reptile never moves it)
        self.adapted_weights = inner_weights(model)
        # the persistent inner Adam state of meta-training (None until the first meta-step or a checkpoint sets it)
        self.inner_optimizer_state: InnerState | None = None

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Plain SGD with LR eps: the step is then exactly eps * (mean phi - theta)."""
        return torch.optim.SGD(params, lr=self.meta_lr)

    def configure_optimizers(self) -> Any:
        """The outer optimizer with LR meta_lr, annealed linearly to meta_lr_final over the run."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        factory = self.optimizer_factory
        optimizer = factory(params, lr=self.meta_lr) if factory is not None else self.default_optimizer(params)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ConfigError("Reptile anneals eps over the whole run, which has no end: set trainer.max_steps (e.g. 100000).")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearAnneal(self.meta_lr_final / self.meta_lr, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def task_indices(self, batch: dict[str, Tensor], loop: InnerLoop, stream: str, task_ids: list[int]) -> Tensor | None:
        """Per-task minibatch plans from generators seeded by (seed, stream, global step, task number)."""
        n = batch["support_x"].shape[1]
        step = self.global_step if stream == "train" else 0
        plans = [minibatch_indices(n, loop, task_generator(self.seed, stream, step, task)) for task in task_ids]
        if plans[0] is None:
            return None
        return torch.stack(plans).to(batch["support_x"].device)

    @property
    def persistent(self) -> bool:
        """Whether the inner Adam's state lives for the whole run (inner_state=persistent)."""
        return self.inner_state == "persistent"

    def current_inner_state(self, params: dict[str, Tensor]) -> InnerState:
        """The meta-training inner state on this module's device (an Adam that has taken no step before the first meta-step)."""
        if self.inner_optimizer_state is None:
            return InnerState.zeros({k: v.detach() for k, v in params.items()})
        return self.inner_optimizer_state.to(self.device)

    def inner_options(self, training: bool) -> dict[str, Any]:
        """Adapt `adapted_weights`; evaluation starts every task from (a copy of) the meta-training inner state when it is persistent."""
        options: dict[str, Any] = {"adapted": self.adapted_weights}
        if training or not self.persistent:
            return options
        return options | {"initial_state": self.current_inner_state(split_state(self.model)[0])}

    def adapt_carrying_state(self, batch: dict[str, Tensor], theta: dict[str, Tensor], indices: Tensor | None, record: str) -> TaskOutcome:
        """Adapt a meta-batch's tasks from theta with the persistent inner state, and keep the state they leave (class docstring)."""
        loop, state = self.train_loop, self.current_inner_state(theta)
        if self.path() == "vmap":
            outcome = self.adapt(batch, loop, theta, indices, training=True, record=record, return_params=True, initial_state=state)
            moments = {part: {k: v.mean(dim=0) for k, v in values.items()} for part, values in outcome.optimizer_state.items()}
            state = state.after(moments, loop.steps)
        else:
            _, fixed = split_state(self.model)

            def task_fn_from(start: InnerState) -> Any:
                return make_task_fn(
                    self.model, fixed, loop, "loop", record=record, return_params=True, initial_state=start, kind=self.task_kind, adapted=self.adapted_weights
                )

            outcome, state = run_tasks_carrying_state(task_fn_from, theta, batch, indices, state, loop.steps)
        self.inner_optimizer_state = self._mean_over_ranks(state)
        return outcome

    def _mean_over_ranks(self, state: InnerState) -> InnerState:
        """The ranks' moments averaged in one all-reduce (every rank then holds the same state); unchanged on one process."""
        if self.world_size == 1:
            return state
        names = list(state.m)
        flat = torch.cat([state.m[k].flatten() for k in names] + [state.v[k].flatten() for k in names])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        m, v, offset = {}, {}, 0
        for part in (m, v):
            for k in names:
                size = state.m[k].numel()
                part[k] = flat[offset : offset + size].view_as(state.m[k]).clone()
                offset += size
        return InnerState(state.step, m, v)

    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Adapt each task from theta, set .grad = theta - mean_i phi_i, averaged across ranks in one all-reduce."""
        params, _ = split_state(self.model)
        theta = {k: v.detach() for k, v in params.items()}
        n_tasks = batch["support_x"].shape[0]
        task_ids = [self.global_rank * n_tasks + j for j in range(n_tasks)]  # each rank holds a contiguous share
        indices = self.task_indices(batch, self.train_loop, "train", task_ids)
        record = "ends" if measure else "none"
        if self.persistent:
            outcome = self.adapt_carrying_state(batch, theta, indices, record)
        else:
            outcome = self.adapt(batch, self.train_loop, theta, indices, training=True, record=record, return_params=True)
        pseudo = torch.cat([(theta[k] - outcome.params[k].mean(dim=0)).flatten() for k in params])
        pseudo = self.trainer.strategy.reduce(pseudo, reduce_op="mean")
        offset = 0
        for k, p in params.items():
            p.grad = pseudo[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return outcome

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the persistent inner Adam state with the weights, so a resumed run continues it exactly."""
        super().on_save_checkpoint(checkpoint)
        state = self.inner_optimizer_state
        if state is not None:
            checkpoint["inner_optimizer_state"] = {
                "step": state.step,
                "m": {k: v.detach().cpu() for k, v in state.m.items()},
                "v": {k: v.detach().cpu() for k, v in state.v.items()},
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the persistent inner Adam state (absent in checkpoints from before the first meta-step)."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("inner_optimizer_state")
        self.inner_optimizer_state = InnerState(saved["step"], saved["m"], saved["v"]) if saved is not None else None
