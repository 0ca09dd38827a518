"""metalight.control.planner: batched random shooting and CEM agree with their loop reference, pick the best
candidate by its discounted return, stay in the action box, plan each environment on its own, and CEM solves a
point mass that random shooting does worse on; benchmarks/planner.py's cases run at a tiny size."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor

from metalight.control import PlannerSettings, plan, plan_loop
from metalight.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("planner_benchmark", ROOT / "benchmarks" / "planner.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["random_shooting", "cem"]
OBS, ACT = 3, 2


def toy_model(envs: int, seed: int = 0):
    """Nonlinear dynamics and a reward (float64) for environments 0..envs-1, each its own weights and target (drawn from
    its own seed): a stand-in for E learned models."""
    draws = [torch.Generator().manual_seed(100 * seed + e) for e in range(envs)]
    w = torch.stack([torch.randn(OBS + ACT, OBS, generator=g, dtype=torch.float64) for g in draws])
    target = torch.stack([torch.randn(OBS, generator=g, dtype=torch.float64) for g in draws])

    def dynamics(obs: Tensor, act: Tensor) -> Tensor:
        return obs + 0.3 * torch.tanh(torch.einsum("eci,eio->eco", torch.cat([obs, act], -1), w))

    def reward(obs: Tensor, act: Tensor, nxt: Tensor) -> Tensor:
        return -(nxt - target[:, None]).square().sum(-1) - 0.1 * act.square().sum(-1)

    return dynamics, reward


def settings(method: str, **kw) -> PlannerSettings:
    """Small planner settings: 24 candidates, horizon 4, CEM 3 iterations of 25% elites."""
    return PlannerSettings(method=method, **{"candidates": 24, "horizon": 4, "cem_iterations": 3, "elite_fraction": 0.25, "discount": 0.9, **kw})


def observations(envs: int, seed: int = 1) -> Tensor:
    """Random observations [E, OBS] in float64."""
    return torch.randn(envs, OBS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_plan_equals_its_loop_reference(method):
    """Same generator state: the batched and the looped planner draw the same candidates and choose the same action."""
    dynamics, reward = toy_model(3)
    calls = []
    counted = lambda o, a: calls.append(a.shape[1]) or dynamics(o, a)  # noqa: E731
    batched = plan(settings(method), counted, reward, observations(3), torch.Generator().manual_seed(5), ACT)
    horizon_calls = len(calls)
    looped = plan_loop(settings(method), counted, reward, observations(3), torch.Generator().manual_seed(5), ACT)
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
    iterations = 3 if method == "cem" else 1
    assert horizon_calls == 4 * iterations and set(calls[:horizon_calls]) == {24}, "one call per horizon step over all candidates"
    assert len(calls) - horizon_calls == 24 * 4 * iterations and set(calls[horizon_calls:]) == {1}


@pytest.mark.parametrize("method", METHODS)
def test_the_action_is_the_first_of_the_best_discounted_return(method):
    """Recomputed from every (state, action, reward) the model saw: the action returned starts the candidate of the
    highest sum_t discount^t r_t (CEM: of its last iteration)."""
    dynamics, reward = toy_model(2)
    seen: list[tuple[Tensor, Tensor]] = []

    def recording(obs: Tensor, act: Tensor, nxt: Tensor) -> Tensor:
        r = reward(obs, act, nxt)
        seen.append((act, r))
        return r

    s = settings(method, discount=0.2)
    action = plan(s, dynamics, recording, observations(2), torch.Generator().manual_seed(4), ACT)
    last = seen[-s.horizon :]  # CEM: the last iteration's candidates
    returns = sum(0.2**t * r for t, (_, r) in enumerate(last))
    undiscounted = sum(r for _, r in last)
    best = returns.argmax(dim=1)
    assert (best != undiscounted.argmax(dim=1)).all(), "the toy must make the discount decide"
    torch.testing.assert_close(action, last[0][0][torch.arange(2), best], rtol=0, atol=0)


def test_random_shooting_takes_the_best_not_the_worst():
    """Reward = the action: out of 1,000 uniform candidates the best one is near the top of the box."""
    s = PlannerSettings(candidates=1000, horizon=1)
    action = plan(s, lambda o, a: o, lambda o, a, n: a[..., 0], torch.zeros(1, 1), torch.Generator().manual_seed(0), 1)
    assert action.item() > 0.99


def point_mass_cost(method: str, candidates: int, iterations: int) -> tuple[float, Tensor]:
    """A 6-D point mass x' = x + 0.1 a from 0 to goal g, reward -|x' - g|^2: closed-loop cost of 15 MPC steps, first action."""
    goal = torch.tensor([[0.5, -0.4, 0.3, -0.6, 0.2, 0.45]], dtype=torch.float64)
    dynamics = lambda x, a: x + 0.1 * a  # noqa: E731
    reward = lambda x, a, nxt: -(nxt - goal[:, None]).square().sum(-1)  # noqa: E731
    s = PlannerSettings(method=method, candidates=candidates, horizon=8, cem_iterations=iterations, discount=1.0)
    generator = torch.Generator().manual_seed(0)
    x, cost, first = torch.zeros(1, 6, dtype=torch.float64), 0.0, None
    for _ in range(15):
        a = plan(s, lambda o, u: dynamics(o, u), reward, x, generator, 6)
        first = a if first is None else first
        x = dynamics(x, a)
        cost += (x - goal).square().sum().item()
    return cost, first


def test_cem_heads_to_the_goal_and_beats_random_shooting_on_the_same_budget():
    cem_cost, first = point_mass_cost("cem", 100, 5)
    rs_cost, _ = point_mass_cost("random_shooting", 500, 1)  # same model evaluations per control step: 500 x 8
    goal_sign = torch.tensor([1, -1, 1, -1, 1, 1], dtype=torch.float64)
    assert (first * goal_sign > 0.5).all(), f"first action {first} should push every coordinate hard towards the goal"
    assert cem_cost < 0.85 * rs_cost, (cem_cost, rs_cost)


@pytest.mark.parametrize("method", METHODS)
def test_actions_stay_in_the_box(method):
    """A reward that pays for leaving the box: every action the model sees and the one returned are inside it."""
    seen = []
    dynamics = lambda o, a: seen.append(a) or o  # noqa: E731
    s = settings(method, action_low=-0.3, action_high=0.5, candidates=64, horizon=2, cem_iterations=6)
    action = plan(s, dynamics, lambda o, a, n: 10 * a.sum(-1), torch.zeros(2, 1), torch.Generator().manual_seed(0), 3)
    for a in [action, *seen]:
        assert a.min() >= -0.3 and a.max() <= 0.5
    assert action.mean() > 0.3, f"{action}: the best candidates lie near the top of the box"


@pytest.mark.parametrize("method", METHODS)
def test_environments_are_planned_independently(method):
    """Environment e's action depends on its own observation and model only (and its own random numbers): changing
    the others' leaves it alone; changing its own moves it."""
    dynamics, reward = toy_model(3, seed=0)
    other_dynamics, other_reward = toy_model(3, seed=7)
    obs, other_obs = observations(3, seed=1), observations(3, seed=9)
    base = plan(settings(method), dynamics, reward, obs, torch.Generator().manual_seed(3), ACT)
    for e in range(3):
        keep = torch.arange(3)[:, None] == e
        mixed_obs = torch.where(keep, obs, other_obs)
        mixed_dynamics = lambda o, a: torch.where(keep[:, :, None], dynamics(o, a), other_dynamics(o, a))  # noqa: E731
        mixed_reward = lambda o, a, n: torch.where(keep, reward(o, a, n), other_reward(o, a, n))  # noqa: E731
        mixed = plan(settings(method), mixed_dynamics, mixed_reward, mixed_obs, torch.Generator().manual_seed(3), ACT)
        torch.testing.assert_close(mixed[e], base[e], rtol=0, atol=0)
        assert not torch.equal(torch.cat([mixed[:e], mixed[e + 1 :]]), torch.cat([base[:e], base[e + 1 :]]))


def test_random_shooting_of_the_first_environment_alone_is_its_row():
    """The candidates are drawn environment-major: the first environment planned alone gets the same action."""
    dynamics, reward = toy_model(3)
    together = plan(settings("random_shooting"), dynamics, reward, observations(3), torch.Generator().manual_seed(4), ACT)
    alone = plan(settings("random_shooting"), *toy_model(1), observations(3)[:1], torch.Generator().manual_seed(4), ACT)
    torch.testing.assert_close(alone[0], together[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("method", "mppi"), ("candidates", 0), ("candidates", 2.5), ("horizon", 0), ("horizon", True), ("cem_iterations", 0),
        ("elite_fraction", 0.0), ("elite_fraction", 1.5), ("cem_alpha", -0.1), ("discount", 0.0), ("discount", 1.1),
        ("action_low", float("nan")), ("action_low", 1.0),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        PlannerSettings(**{key: value})
    message = str(error.value)
    assert message.startswith(f"data.planner.{key}={value!r}") and "\n" not in message, message


def test_elites_count_as_theirs():
    """max(int(candidates * elite_fraction), 1), as learning_to_adapt's get_cem_action."""
    assert PlannerSettings(candidates=500, elite_fraction=0.1).elites == 50
    assert PlannerSettings(candidates=5, elite_fraction=0.1).elites == 1


@pytest.mark.parametrize("method", METHODS)
def test_benchmark_cases_compare_equal_computations(monkeypatch, method):
    """Every case of benchmarks/planner.py, shrunk (8 hidden, 6 candidates, horizon 3, its E), in float64: plan and
    plan_loop choose the same actions on the benchmark's models and reward, so the ratio times the same work."""
    for case, (_, _, _, envs) in list(bench.CASES.items()):
        monkeypatch.setitem(bench.CASES, case, ((8,), 6, 3, envs))
        s, dynamics, obs = bench.make_case(case, method, torch.device("cpu"), torch.float64)
        batched = plan(s, dynamics, bench.halfcheetah_reward, obs, torch.Generator().manual_seed(0), bench.ACTION_DIM)
        looped = plan_loop(s, dynamics, bench.halfcheetah_reward, obs, torch.Generator().manual_seed(0), bench.ACTION_DIM)
        assert batched.shape == (envs, bench.ACTION_DIM)
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_benchmark_row_and_table(monkeypatch):
    """A row of the benchmark at a tiny size; the CPU memory column sees the step's activations: 200 candidates x 128
    hidden units in float32 are 0.1 MiB a layer."""
    monkeypatch.setitem(bench.CASES, "tiny", ((8,), 6, 3, 2))
    row = bench.measure("tiny", "cem", torch.device("cpu"), repeats=1, memory=True)
    assert row["plan steps/s"] > 0 and row["loop steps/s"] > 0 and row["ratio"] > 0 and row["plan peak MiB"] >= 0
    assert bench.table([row]).count("\n") == 2
    assert 0.2 < bench.peak_mib("small_200x10_e1", "random_shooting", torch.device("cpu")) < 2
