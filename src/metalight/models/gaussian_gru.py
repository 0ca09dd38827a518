"""A recurrent Gaussian policy for RL² (Duan et al. 2016): a GRU reads (observation, previous action, reward, done flag), a linear
layer gives the mean action, one learned log-std per action dimension (garage's GaussianGRUPolicy, state-independent std)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from metalight.errors import ConfigError


class GaussianGRU(nn.Module):
    """pi(a_t | h_t) = N(mean(h_t), diag(std^2)), h_t = GRU(x_t, h_{t-1}), x_t = [o_t, a_{t-1}, r_{t-1}, d_t].

    in_features is the environment's observation size and out_features its action size: the GRU itself reads
    in_features + out_features + 2 numbers (`input_features`). `step` advances one time step (the sampler's call);
    `forward` unrolls whole trials from the zero state, episode after episode, each episode a packed sequence of its
    live steps, so the state is left unchanged by the steps after an episode ended early, as the sampler leaves it
    (torch's fused GRU over the sequence, not one Python call per step: the same function to about 1e-7). The
    learner (algo=rl2) builds the inputs.
    """

    recurrent = True  # what algo=rl2 checks a model for

    def __init__(self, in_features: int = 2, out_features: int = 2, hidden: int = 64, init_std: float = 1.0, min_std: float = 1e-6) -> None:
        super().__init__()
        for key, value in (("in_features", in_features), ("out_features", out_features), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r} is not valid: use a whole number >= 1.")
        if not (init_std > 0 and min_std > 0):
            raise ConfigError(f"model.init_std={init_std!r} and model.min_std={min_std!r} must be numbers > 0.")
        self.in_features, self.out_features, self.hidden = in_features, out_features, hidden
        self.input_features = in_features + out_features + 2
        self.gru = nn.GRU(self.input_features, hidden, batch_first=True)
        self.mean = nn.Linear(hidden, out_features)
        nn.init.xavier_uniform_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.full((out_features,), math.log(init_std)))
        self.min_log_std = math.log(min_std)

    def initial_state(self, *batch_shape: int) -> Tensor:
        """The state at the start of a trial: zeros [*batch_shape, hidden]."""
        weight = self.mean.weight
        return weight.new_zeros(*batch_shape, self.hidden)

    def std(self) -> Tensor:
        """The action standard deviations [out_features]."""
        return self.log_std.clamp(min=self.min_log_std).exp()

    def step(self, inputs: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One time step of every copy: inputs [..., input_features], state [..., hidden] -> (mean [..., A], std [A], new state [..., hidden])."""
        shape = inputs.shape[:-1]
        _, new_state = self.gru(inputs.reshape(-1, 1, self.input_features), state.reshape(1, -1, self.hidden))
        new_state = new_state.view(*shape, self.hidden)
        return self.mean(new_state), self.std(), new_state

    def forward(self, inputs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Unroll trials from the zero state: inputs [..., E, H, input_features] (E episodes of H steps), mask [..., E, H] whose live
        steps are a prefix of each episode (at least its first) -> (means [..., E, H, A], std [A]); the state flows from each
        episode's last live step into the next episode."""
        *batch, episodes, horizon, features = inputs.shape
        x, live = inputs.reshape(-1, episodes, horizon, features), mask.reshape(-1, episodes, horizon)
        state, outputs = self.initial_state(1, x.shape[0]), []
        for e in range(episodes):
            lengths = live[:, e].sum(-1).long().cpu()
            if bool((lengths == horizon).all()):  # no episode ended early: the plain sequence (packing costs more)
                output, state = self.gru(x[:, e], state)
            else:
                packed = pack_padded_sequence(x[:, e], lengths, batch_first=True, enforce_sorted=False)
                output, state = self.gru(packed, state)
                output = pad_packed_sequence(output, batch_first=True, total_length=horizon)[0]
            outputs.append(output)
        means = self.mean(torch.stack(outputs, 1))
        return means.view(*batch, episodes, horizon, self.out_features), self.std()
