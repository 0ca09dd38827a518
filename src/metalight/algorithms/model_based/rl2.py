"""RL² (Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning"): a recurrent policy that learns a task
within one trial, trained by PPO on whole trials (algo=rl2).

A trial is `episodes_per_trial` episodes of one task in a row. The policy (model=gaussian_gru) reads at every step
x_t = [o_t, a_{t-1}, r_{t-1}, d_t]: the observation, the action and reward of the previous live step of the trial
(zeros at the trial's first step) and d_t = 1 at the first step of every episode but the first (the previous one
ended). Its hidden state starts at zero for each trial (each task) and is carried across the episodes' boundaries,
so what it saw in episode 1 can steer episodes 2, 3, ...: adapting to a task is the forward pass, no gradient step.

Sampling reuses the vector-environment sampler (policy_gradient.sample_rollouts): every task x `rollouts` trials run
in one vector environment, episode e of a trial being sampling phase e (its noise from the task's seed and e; each
episode starts from the task's start states, as MAML's phases do), while a TrialActor carries each copy's hidden
state, last action and reward between steps and episodes. Training: GAE on a linear feature baseline fitted per task
over the flattened trial (its time feature counts trial steps), discounting across the episodes' boundaries (garage's
RL2 concatenates a trial's episodes into one path), advantages normalized per task, then `epochs` full-batch Adam
steps on PPO's clipped surrogate, the log-likelihoods recomputed by unrolling the GRU over the stored trials.

Validation and test run one trial per rollout on each fixed task and score its return in each episode:
val/return_step0, step1, ... are episodes 1, 2, ... (where MAML-RL logs the return before and after each inner
step); val/return is the last episode's.

References and where we differ (conf/algo/rl2.yaml says the same):
- garage (rlworkgroup/garage, tf/algos/rl2.py, examples/tf/rl2_ppo_halfcheetah.py): GRU of 64, episode_per_task 4,
  PPO lr 1e-3, clip 0.2, gamma 0.99, GAE lambda 0.95, 10 epochs of minibatches of 32, an entropy bonus (0.02, max
  entropy), advantages not centred; its RL2Env feeds zeros for (a, r, d) at every episode's first step, so the done
  flag never reaches the policy. Ours: the paper's inputs (d_t = 1 with the previous episode's last a and r).
- ProMP (jonasrothfuss/ProMP configs/rl2_config.json, run_scripts/rl2_run_sweep.py): LSTM of 64, 2 episodes per
  trial, PPO lr 1e-3, 5 full-batch epochs, gamma 0.99, lambda 1, normalized advantages; no entropy bonus. Our defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalight.algorithms.base import EpisodicModule, OptimizerFactory, SchedulerFactory
from metalight.algorithms.optimization.functional import TaskOutcome
from metalight.algorithms.rl.policy_gradient import Rollouts, advantages, check_discounts, gaussian_log_prob, sample_rollouts
from metalight.algorithms.rl.ppo import EpochSteps, check_ppo_settings, clipped_losses
from metalight.errors import ConfigError
from metalight.tasks.kinds import TaskKind
from metalight.tasks.rl import TaskEnvironment


class TrialActor:
    """The policy of a trial in the sampler: each task x rollout copy's hidden state, last live action and reward, and done flag.

    Call it with the observations [B, R, O] for (mean, std); `observe` (sample_rollouts' step observer) then
    commits the step where it was live, as the model's unroll does; `start_episode(e)` raises the done flag for
    every episode after the first.
    """

    def __init__(self, model: nn.Module, n_tasks: int, rollouts: int, action_dim: int, like: Tensor) -> None:
        self.model = model
        self.state = model.initial_state(n_tasks, rollouts)
        self.action = like.new_zeros(n_tasks, rollouts, action_dim)
        self.reward = like.new_zeros(n_tasks, rollouts)
        self.done = like.new_zeros(n_tasks, rollouts)
        self.pending: Tensor | None = None

    def start_episode(self, episode: int) -> None:
        """Episode `episode` (0: the trial's first) starts: the done flag says whether a previous one ended."""
        self.done = torch.full_like(self.done, float(episode > 0))

    def __call__(self, observation: Tensor) -> tuple[Tensor, Tensor]:
        inputs = torch.cat([observation, self.action, self.reward.unsqueeze(-1), self.done.unsqueeze(-1)], -1)
        mean, std, self.pending = self.model.step(inputs, self.state)
        return mean, std

    def observe(self, action: Tensor, reward: Tensor, alive: Tensor) -> None:
        """Keep the step's new state, action and reward where it was live (a finished episode's copy waits unchanged)."""
        live = alive > 0
        self.state = torch.where(live.unsqueeze(-1), self.pending, self.state)
        self.action = torch.where(live.unsqueeze(-1), action, self.action)
        self.reward = torch.where(live, reward.to(self.reward), self.reward)
        self.done = torch.where(live, torch.zeros_like(self.done), self.done)


def trial_inputs(trials: Rollouts, horizon: int) -> Tensor:
    """The policy's inputs at every step of flattened trials [B, R, T = episodes * horizon]: [o_t, a_{t-1}, r_{t-1}, d_t] [B, R, T, O + A + 2].

    a_{t-1} and r_{t-1} are those of the last live step before t (zero before the first), d_t is 1 at the first
    step of every episode but the first: what TrialActor fed the policy while sampling.
    """
    mask, steps = trials.mask, trials.mask.shape[-1]
    index = torch.arange(steps, device=mask.device).expand_as(mask)
    last_live = torch.where(mask > 0, index, torch.full_like(index, -1)).cummax(-1).values  # last live step at or before t
    previous = torch.cat([torch.full_like(last_live[..., :1], -1), last_live[..., :-1]], -1)  # ... strictly before t
    seen = (previous >= 0).to(trials.rewards.dtype)
    at = previous.clamp(min=0)
    action = trials.actions.gather(-2, at.unsqueeze(-1).expand_as(trials.actions)) * seen.unsqueeze(-1)
    reward = trials.rewards.gather(-1, at) * seen
    done = (index % horizon == 0) & (index > 0)
    return torch.cat([trials.observations, action, reward.unsqueeze(-1), done.to(reward.dtype).unsqueeze(-1)], -1)


def flatten_trials(trials: Rollouts) -> Rollouts:
    """Trials [B, R, E, H, ...] as one sequence each, [B, R, E * H, ...]."""
    return Rollouts(*(part.flatten(2, 3) for part in trials))


class RL2(EpochSteps, EpisodicModule):
    """RL²: a GRU policy whose state persists across the episodes of a task's trial, PPO on whole trials (algo=rl2)."""

    task_kinds = ("reinforcement",)
    # its evaluation scores the episodes of a trial, not inner steps (the navigation figure's legend says so)
    adapts_within_trial = True

    def __init__(
        self,
        model: nn.Module,
        episodes_per_trial: int = 2,
        clip: float = 0.2,
        epochs: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        baseline_reg: float = 1e-5,
        normalize_advantages: bool = True,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        gradient_clip_val: float | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(model, optimizer, scheduler, gradient_clip_val, "loop", max_nonfinite_steps)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        if isinstance(episodes_per_trial, bool) or not isinstance(episodes_per_trial, int) or episodes_per_trial < 1:
            raise ConfigError(f"algo.episodes_per_trial={episodes_per_trial!r} is not valid: use a whole number >= 1 (ProMP: 2, garage: 4).")
        check_ppo_settings(clip, epochs, optimizer, "rl2")
        check_discounts(gamma, gae_lambda)
        self.episodes_per_trial, self.clip, self.epochs = episodes_per_trial, float(clip), epochs
        self.gamma, self.gae_lambda, self.baseline_reg, self.normalize_advantages = gamma, gae_lambda, baseline_reg, normalize_advantages
        self.environment: TaskEnvironment | None = None
        self.last_clipped = 0.0

    @property
    def eval_steps(self) -> int:
        """Scores per task at evaluation, less one: the episodes of a trial after the first (val/return_step<k> is episode k + 1)."""
        return self.episodes_per_trial - 1

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam with ProMP's and garage's learning rate, 1e-3."""
        return torch.optim.Adam(params, lr=1e-3)

    def use_task_kind(self, kind: TaskKind) -> None:
        """Take the RL tasks' environment, checking that the model is a recurrent Gaussian policy of its sizes."""
        super().use_task_kind(kind)
        environment = getattr(kind, "environment", None)
        if environment is None:
            raise ConfigError("algo=rl2 needs tasks with an environment: use data=navigation2d, halfcheetah_dir, halfcheetah_vel or metaworld_ml1.")
        if not all(callable(getattr(self.model, name, None)) for name in ("step", "initial_state")) or not getattr(self.model, "recurrent", False):
            raise ConfigError(
                f"algo=rl2 needs a recurrent Gaussian policy (step, initial_state) whose state carries a trial, but {type(self.model).__name__} "
                "is none: use model=gaussian_gru."
            )
        for key, wanted in (("in_features", environment.observation_dim), ("out_features", environment.action_dim)):
            if getattr(self.model, key, wanted) != wanted:
                raise ConfigError(
                    f"the policy has model.{key}={getattr(self.model, key)} but data.env={environment.name} needs {wanted}: set model.{key}={wanted}."
                )
        self.environment = environment

    def batch_size_of(self, batch: dict[str, Tensor]) -> int:
        """Tasks in a meta-batch."""
        return batch["tasks"].shape[0]

    def tasks_in(self, batch: dict[str, Tensor]) -> int:
        """Tasks in an evaluation batch."""
        return batch["tasks"].shape[0]

    # ---- trials ----------------------------------------------------------------------------------
    def sample_trials(self, batch: dict[str, Tensor], rollouts: int) -> tuple[Rollouts, TrialActor]:
        """`rollouts` trials of every task (no gradient): episodes [B, R, E, H, ...], and the actor that played them."""
        env = self.environment
        actor = TrialActor(self.model, len(batch["tasks"]), rollouts, env.action_dim, batch["tasks"])
        episodes = []
        for episode in range(self.episodes_per_trial):
            actor.start_episode(episode)
            episodes.append(sample_rollouts(env, actor, batch["tasks"], batch["seeds"], episode, rollouts, observe=actor.observe))
        return Rollouts(*(torch.stack(parts, 2) for parts in zip(*episodes))), actor

    def episode_returns(self, trials: Rollouts) -> Tensor:
        """Each task's average return in each episode of its trials [B, E]."""
        rewards, mask = trials.rewards.transpose(1, 2), trials.mask.transpose(1, 2)  # [B, E, R, H]
        return torch.vmap(torch.vmap(self.task_kind.score))(rewards, mask)

    def log_likelihoods(self, flat: Rollouts) -> Tensor:
        """log pi(a_t | x_1..t) of every step of flattened trials [B, R, T], the GRU unrolled over each trial from its zero state."""
        episodes, horizon = self.episodes_per_trial, self.environment.horizon
        inputs = trial_inputs(flat, horizon).unflatten(2, (episodes, horizon))
        mean, std = self.model(inputs, flat.mask.unflatten(2, (episodes, horizon)))
        return gaussian_log_prob(mean.flatten(2, 3), std, flat.actions)

    # ---- meta-training ---------------------------------------------------------------------------
    def compute_meta_gradient(self, batch: dict[str, Tensor], measure: bool) -> TaskOutcome:
        """Sample trials, then `epochs` times: backpropagate PPO's clipped surrogate of the whole trials, and step (all epochs but the last)."""
        trials, _ = self.sample_trials(batch, self.environment.rollouts)
        flat = flatten_trials(trials)
        advantage = advantages(flat, self.gamma, self.gae_lambda, self.baseline_reg, self.normalize_advantages)
        with torch.no_grad():
            sampled_log_prob = self.log_likelihoods(flat)
        first = None
        for epoch in range(self.epochs):
            losses, self.last_clipped = clipped_losses(self.log_likelihoods(flat), sampled_log_prob, advantage, flat.mask, self.clip, self.task_kind.loss)
            self.manual_backward(losses.mean())  # DDP averages each epoch's gradient
            first = losses.detach() if first is None else first
            if epoch < self.epochs - 1 and not self.step_within_meta_batch():
                break
        return TaskOutcome(first, self.episode_returns(trials), {}, first.new_zeros(0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The meta-step, then the first and last episodes' training returns and the clipped fraction of the last epoch."""
        super().training_step(batch, batch_idx)
        self.log("train/ppo_clipped", self.last_clipped, on_step=True, on_epoch=False, batch_size=self.batch_size_of(batch))

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate_tasks(self, batch: dict[str, Tensor], stream: str, task_ids: list[int], keep_logits: bool = False) -> TaskOutcome:
        """Each task's return in each episode of `eval_rollouts` trials, scores [B, E]; loss: minus the last episode's.

        keep_logits: also return the episodes' observations [B, E, R, H, O] (the trajectories the navigation figure draws).
        """
        with torch.no_grad():
            trials, _ = self.sample_trials(batch, self.environment.eval_rollouts)
        returns = self.episode_returns(trials)
        observations = trials.observations.transpose(1, 2) if keep_logits else returns.new_zeros(0)
        return TaskOutcome(-returns[:, -1], returns, {}, observations)
