"""Model-based meta-RL's task stream (GrBAL, Nagabandi et al. 2019): dynamics-model regression tasks cut from the episodes
a controller collects, iteration by iteration (data=grbal_*).

A task is a stretch of `past` + `future` consecutive transitions of one episode: the support set is the first `past`
(M: the recent past the model adapts to), the query set the next `future` (K: what it must then predict). Inputs are
raw (observation, action) rows, targets the change of observation in the model's normalized units (models/dynamics.py
carries the statistics). So it is a regression task (kind REGRESSION): MAML, first-order MAML, Meta-SGD and the
pretrained baseline fit it unchanged, and their inner loop is the online adaptation.

The collect-and-fit loop of learning_to_adapt's Trainer is the epoch: the first training batch of epoch e has
iteration e's episodes collected first (`rollouts` episodes of `episode_length` steps on training bodies: random
actions at iteration 0 as their initial_random_samples, then the MPC controller through the current model, adapted
online unless adapt_online=false), the model's normalization statistics are set from that iteration's transitions
(their fit() recomputes them on each new batch of data), and the epoch's meta-steps fit the model to segments of all
episodes so far. The episodes are the data module's state: every checkpoint holds them, so a resumed run has exactly
the data it had. Every DDP process collects the same episodes (same seeds, same weights); the meta-batch is split.

Validation and test tasks are segments of random-action episodes on held-out bodies (eval_seed), scored by the
learner as any regression task (val/mse_step0: the model unadapted, val/mse_step1: adapted); ControllerEvaluation
(tasks/controller_evaluation.py) scores the controller itself: the return on held-out bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import Dataset

from metalight.control.mpc import Act, Episodes, LearnedModel, model_predictive_controller, random_controller, run_episodes
from metalight.control.planner import PlannerSettings
from metalight.errors import ConfigError
from metalight.tasks.datamodule import TaskDataModule, check_whole_number, plain_dict
from metalight.tasks.kinds import REGRESSION, TaskKind
from metalight.tasks.rl import SPLIT_CODES, EnvironmentTasks, checked_environment
from metalight.tasks.samplers import Key

COLLECTION, RANDOM_EPISODES, CONTROLLER = 3, 4, 5  # generator streams besides the splits' 0, 1, 2


def generator_seed(*numbers: int) -> int:
    """A 62-bit seed that is a pure function of the numbers (for torch generators)."""
    return int(np.random.default_rng(list(numbers)).integers(2**62))


class EpisodeBuffer:
    """The episodes collected so far, one block per iteration: what a resumed run needs besides the weights."""

    def __init__(self) -> None:
        self.blocks: list[Episodes] = []

    @property
    def iterations(self) -> int:
        """Iterations collected."""
        return len(self.blocks)

    def add(self, episodes: Episodes) -> None:
        """Keep an iteration's episodes (on the CPU)."""
        self.blocks.append(Episodes(episodes.observations.cpu(), episodes.actions.cpu(), episodes.rewards.cpu()))

    def segment(self, rng: np.random.Generator, length: int) -> tuple[Tensor, Tensor]:
        """`length` consecutive transitions of an episode drawn uniformly among all: observations [length + 1, O], actions [length, A]."""
        sizes = [len(block.actions) for block in self.blocks]
        episode = int(rng.integers(sum(sizes)))
        block = 0
        while episode >= sizes[block]:
            episode, block = episode - sizes[block], block + 1
        chosen = self.blocks[block]
        start = int(rng.integers(chosen.actions.shape[1] - length + 1))
        return chosen.observations[episode, start : start + length + 1], chosen.actions[episode, start : start + length]

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The episodes as lists of tensors (a checkpoint loads them with weights_only=True)."""
        return {"observations": [b.observations for b in self.blocks], "actions": [b.actions for b in self.blocks], "rewards": [b.rewards for b in self.blocks]}

    def load_state_dict(self, state: Mapping[str, list[Tensor]]) -> None:
        """Restore the episodes of state_dict()."""
        self.blocks = [Episodes(o, a, r) for o, a, r in zip(state["observations"], state["actions"], state["rewards"])]


class TransitionSegments(Dataset):
    """A split as dynamics tasks: dataset[[(epoch, index), ...]] is the meta-batch of those segments (support_x/y, query_x/y).

    Segment (epoch, index) is drawn from numpy's generator of (seed, split, epoch, index) out of the episodes `source(epoch)`
    returns (for training: the buffer, once iteration `epoch` is collected); targets in the units of `model()`'s statistics.
    """

    def __init__(self, source: Callable[[int], EpisodeBuffer], model: Callable[[], Any], split: str, seed: int, past: int, future: int) -> None:
        self.source, self.model, self.split, self.seed, self.past, self.future = source, model, split, seed, past, future

    def __getitem__(self, keys: Sequence[Key]) -> dict[str, Tensor]:
        buffer = self.source(max(epoch for epoch, _ in keys))
        model = self.model()
        mean, std = model.delta_mean.detach().cpu(), model.delta_std.detach().cpu()
        xs, ys = [], []
        for epoch, index in keys:
            rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], epoch, index])
            observations, actions = buffer.segment(rng, self.past + self.future)
            xs.append(torch.cat([observations[:-1], actions], -1))
            ys.append((observations[1:] - observations[:-1] - mean) / (std + 1e-10))
        x, y = torch.stack(xs), torch.stack(ys)
        m = self.past
        return {"support_x": x[:, :m], "support_y": y[:, :m], "query_x": x[:, m:], "query_y": y[:, m:]}


class DynamicsDataModule(TaskDataModule):
    """GrBAL's collect-and-fit loop as a regression data module: collected episodes -> (past, future) segments; see the module docstring.

    env / env_options: the body family (data.env, e.g. halfcheetah_cripple); episode_length: steps per episode (their
    max_path_length); rollouts: episodes collected per iteration; planner: the MPC settings (control/planner.py);
    adapt_online: whether the controller adapts the model every step (false: MB-MPC's controller);
    random_episodes: held-out-body episodes of random actions the val/test segments are cut from; val_episodes /
    test_episodes: held-out bodies the controller is scored on (ControllerEvaluation).
    """

    kind: TaskKind = REGRESSION
    # what a run is judged by besides the learner's MSE: the controller's return (ControllerEvaluation logs it)
    run_metrics = ("return",)

    def __init__(
        self,
        env: str,
        env_options: Mapping | None = None,
        episode_length: int = 1000,
        rollouts: int = 5,
        random_first_iteration: bool = True,
        past: int = 16,
        future: int = 16,
        planner: Mapping | None = None,
        adapt_online: bool = True,
        observation_dim: int | None = None,
        action_dim: int | None = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
        random_episodes: int = 4,
        val_episodes: int = 4,
        test_episodes: int = 20,
        meta_batch_size: int = 10,
        eval_batch_size: int = 50,
        batches_per_epoch: int = 100,
        n_val_tasks: int = 100,
        n_test_tasks: int = 200,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        for key, value, smallest in (
            ("episode_length", episode_length, 2), ("rollouts", rollouts, 1), ("past", past, 1), ("future", future, 1),
            ("random_episodes", random_episodes, 1), ("val_episodes", val_episodes, 1), ("test_episodes", test_episodes, 1),
        ):
            check_whole_number(key, value, smallest)
        if num_workers != 0:
            raise ConfigError(f"data.num_workers={num_workers!r}: the dynamics tasks are cut from episodes this process collects while training, so they are drawn in it: set data.num_workers=0.")
        if past + future > episode_length:
            raise ConfigError(f"data.past + data.future = {past + future} transitions per task, but an episode has only data.episode_length={episode_length}: lower them or lengthen the episodes.")
        for key, value in (("random_first_iteration", random_first_iteration), ("adapt_online", adapt_online)):
            if not isinstance(value, bool):
                raise ConfigError(f"data.{key}={value!r} must be true or false.")
        self.env_class, self.env_options = checked_environment(env, env_options)
        if not callable(getattr(self.env_class, "reward", None)):
            raise ConfigError(f"data.env={env} gives no reward function a planner can score imagined steps with: model-based control needs one (e.g. data.env=halfcheetah_cripple).")
        dims = (self.env_class.observation_dim, self.env_class.action_dim)
        sizes = (("observation_dim", observation_dim, dims[0]), ("action_dim", action_dim, dims[1]), ("input_dim", input_dim, sum(dims)), ("output_dim", output_dim, dims[0]))
        for key, value, expected in sizes:
            if value is not None and value != expected:
                raise ConfigError(f"data.{key}={value!r} but data.env={env} has {expected}: set data.{key}={expected} (the model's sizes read it).")
        super().__init__(meta_batch_size, eval_batch_size, batches_per_epoch, n_val_tasks, n_test_tasks, seed, eval_seed, 0, pin_memory, persistent_workers)
        self.env, self.observation_dim, self.action_dim = env, dims[0], dims[1]
        self.episode_length, self.rollouts, self.random_first_iteration = episode_length, rollouts, random_first_iteration
        self.past, self.future, self.adapt_online = past, future, adapt_online
        self.planner = PlannerSettings(**plain_dict(planner))
        self.random_episodes, self.val_episodes, self.test_episodes = random_episodes, val_episodes, test_episodes
        self.buffer = EpisodeBuffer()
        self._held_out: dict[str, EpisodeBuffer] = {}
        self.collected_returns: list[float] = []  # mean return of each iteration's episodes (their AverageReturn)

    # ---- bodies and episodes ------------------------------------------------------------------
    def bodies(self, split: str) -> EnvironmentTasks:
        """The body stream of `split`: training bodies of `seed`, held-out val/test bodies of eval_seed."""
        draw = lambda rng: self.env_class.draw_task(rng, split=split, **self.env_options)  # noqa: E731
        return EnvironmentTasks(draw, split, self.seed if split == "train" else self.eval_seed)

    def episodes(self, split: str, epoch: int, count: int, act: Act) -> Episodes:
        """One episode on each of bodies (epoch, 0..count-1) of `split`, acting with `act` (all bodies in one vector environment)."""
        batch = self.bodies(split)[[(epoch, i) for i in range(count)]]
        return run_episodes(self.make_env(count), batch["tasks"], batch["seeds"].tolist(), self.episode_length, act)

    def make_env(self, count: int) -> Any:
        """A vector environment of `count` bodies (eval.py's video recorder wraps it to keep the test's states)."""
        return self.env_class(count, horizon=self.episode_length, **self.env_options)

    def check_learner(self, module: Any) -> None:
        """ConfigError unless the learner's model is a dynamics model and, when adapt_online, it adapts by gradient steps."""
        if not all(callable(getattr(module.model, name, None)) for name in ("set_normalization", "normalized_delta", "next_observation")):
            raise ConfigError(f"data.env={self.env} learns a dynamics model: use model=dynamics_mlp, not {type(module.model).__name__}.")
        if self.adapt_online and getattr(module, "eval_loop", None) is None:
            raise ConfigError(f"algo={type(module).__name__} does not adapt by gradient steps, which GrBAL's online adaptation is: use algo=maml, fomaml, metasgd (or data.adapt_online=false).")

    def learner(self) -> Any:
        """The attached learner, checked (check_learner)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise RuntimeError("the dynamics data module collects with the learner a Trainer attaches: use it through trainer.fit/test")
        self.check_learner(module)
        return module

    def learned_model(self, adapt: bool) -> LearnedModel:
        """The learner's current model as the controller uses it (adapting with the learner's evaluation inner loop when `adapt`)."""
        module = self.learner()
        model = module.model
        fixed = dict(model.named_buffers())  # the normalization (frozen weights, if any, functional_call takes from the model)
        weights = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        predict = lambda w, x: torch.func.vmap(lambda we, xe: functional_call(model, (we, fixed), (xe,)))(w, x)  # noqa: E731
        return LearnedModel(weights, predict, model.next_observation, model.normalized_delta, module.weights_adapted_to if adapt else None)

    def controller(self, adapt: bool, *seed: int) -> Act:
        """The MPC controller through the learner's model (on its device and in its precision; the environments stay on the CPU in
        float32), its noise from `seed`."""
        model = self.learned_model(adapt)
        weight = next(iter(model.weights.values()))
        generator = torch.Generator(device=weight.device).manual_seed(generator_seed(*seed))
        act = model_predictive_controller(model, self.planner, self.reward_function(), self.action_dim, self.past, generator)
        to_model = dict(device=weight.device, dtype=weight.dtype)
        return lambda observations, actions: act(observations.to(**to_model), actions.to(**to_model)).float().cpu()

    def random_policy(self, *seed: int) -> Act:
        """Uniform actions in the planner's box, their noise from `seed` (iteration 0's collection, the random baseline)."""
        return random_controller(self.action_dim, self.planner.action_low, self.planner.action_high, torch.Generator().manual_seed(generator_seed(*seed)))

    def reward_function(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The environment's reward of (observations, actions, next observations), for the planner's imagined steps."""
        return self.env_class(1, horizon=self.episode_length, **self.env_options).reward

    # ---- the collect-and-fit loop ---------------------------------------------------------------
    def collected(self, epoch: int) -> EpisodeBuffer:
        """The buffer once iterations 0..epoch are collected (collecting what is missing, in order)."""
        while self.buffer.iterations <= epoch:
            self.collect(self.buffer.iterations)
        return self.buffer

    def collect(self, iteration: int) -> None:
        """Iteration `iteration`'s episodes on training bodies (random actions first, then the MPC controller), then the model's statistics."""
        if iteration == 0 and self.random_first_iteration:
            act = self.random_policy(self.seed, COLLECTION, iteration)
        else:
            act = self.controller(self.adapt_online, self.seed, COLLECTION, iteration)
        episodes = self.episodes("train", iteration, self.rollouts, act)
        self.buffer.add(episodes)
        self.collected_returns.append(float(episodes.returns.mean()))
        inputs = torch.cat([episodes.observations[:, :-1], episodes.actions], -1).flatten(0, 1)
        deltas = (episodes.observations[:, 1:] - episodes.observations[:, :-1]).flatten(0, 1)
        module = self.learner()
        module.model.set_normalization(inputs.to(module.device), deltas.to(module.device))

    def held_out(self, split: str) -> EpisodeBuffer:
        """Random-action episodes on the held-out bodies of `split` (fixed by eval_seed): what val/test segments are cut from."""
        if split not in self._held_out:
            act = self.random_policy(self.eval_seed, RANDOM_EPISODES, SPLIT_CODES[split])
            buffer = EpisodeBuffer()
            buffer.add(self.episodes(split, 0, self.random_episodes, act))
            self._held_out[split] = buffer
        return self._held_out[split]

    def setup(self, stage: str | None = None) -> None:
        """The three task streams: training segments from the collected episodes, val/test segments from held-out bodies."""
        if not self._datasets:
            model = lambda: self.learner().model  # noqa: E731
            common = dict(past=self.past, future=self.future)
            self._datasets = {
                "train": TransitionSegments(self.collected, model, "train", self.seed, **common),
                "val": TransitionSegments(lambda epoch: self.held_out("val"), model, "val", self.eval_seed, **common),
                "test": TransitionSegments(lambda epoch: self.held_out("test"), model, "test", self.eval_seed, **common),
            }

    # ---- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The collected episodes and the returns of each iteration (saved in every checkpoint)."""
        return {"buffer": self.buffer.state_dict(), "collected_returns": list(self.collected_returns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the episodes of a checkpoint."""
        self.buffer.load_state_dict(state["buffer"])
        self.collected_returns = list(state["collected_returns"])
