"""Regression task families: a family is a function of a random generator that returns one task (a function to fit).

`data.family` names one by its dotted path, here or in your own package; `data.family_options` are its
keyword arguments. A family returns either a plain function y = f(x) on arrays x [n, input_dim] ->
y [n, output_dim], whose inputs are then drawn uniformly from `data.x_range`, or a `RegressionTask`
that also says how its inputs are drawn. Everything random must come from the generator given, so a
task is a pure function of (seed, split, epoch, index), on every rank and in every resumed run.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metalight.errors import ConfigError

Function = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RegressionTask:
    """One task: its function, and how its inputs are drawn (None: uniformly over data.x_range)."""

    function: Function
    inputs: Callable[[np.random.Generator, int], np.ndarray] | None = None


def import_callable(path: str, key: str, hint: str) -> Callable:
    """The callable at dotted `path` (package.module.name); ConfigError naming `key` when it cannot be imported."""
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}={path!r} is not a dotted path (package.module.function): give {hint}.")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{key}={path!r} cannot be imported ({type(error).__name__}: {error}): give {hint}.") from None
    if not callable(target):
        raise ConfigError(f"{key}={path!r} is not a callable: give {hint}.")
    return target


def check_range(name: str, bounds: Sequence[float], key: str = "data.family_options") -> tuple[float, float]:
    """[low, high] as floats with low < high; ConfigError naming <key>.<name> (a family's option by default) otherwise."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}.{name}={bounds!r} is not a range: give [low, high], e.g. [0.1, 5.0].") from None
    if not low < high:
        raise ConfigError(f"{key}.{name}=[{low}, {high}] is empty or inverted: give [low, high] with low < high.")
    return low, high


def sinusoid(rng: np.random.Generator, amplitude: Sequence[float] = (0.1, 5.0), phase: Sequence[float] = (0.0, math.pi)) -> Function:
    """y = A sin(x - b), A ~ U[amplitude], b ~ U[phase] (Finn et al. 2017, §5.1; cbfinn/maml data_generator.py)."""
    a = rng.uniform(*check_range("amplitude", amplitude))
    b = rng.uniform(*check_range("phase", phase))
    return lambda x: a * np.sin(x - b)


def line(rng: np.random.Generator, slope: Sequence[float] = (-3.0, 3.0), intercept: Sequence[float] = (-3.0, 3.0)) -> Function:
    """y = s x + c, s ~ U[slope], c ~ U[intercept] (the line half of Finn et al. 2018's mixture)."""
    s = rng.uniform(*check_range("slope", slope))
    c = rng.uniform(*check_range("intercept", intercept))
    return lambda x: s * x + c


def sine_and_line(
    rng: np.random.Generator,
    amplitude: Sequence[float] = (0.1, 5.0),
    phase: Sequence[float] = (0.0, math.pi),
    slope: Sequence[float] = (-3.0, 3.0),
    intercept: Sequence[float] = (-3.0, 3.0),
) -> Function:
    """Half sinusoids, half lines (Finn, Xu & Levine 2018, Probabilistic MAML; torchmeta's SinusoidAndLine ranges)."""
    if rng.random() < 0.5:
        return sinusoid(rng, amplitude, phase)
    return line(rng, slope, intercept)


def harmonic(
    rng: np.random.Generator, frequency: Sequence[float] = (5.0, 7.0), input_mean: Sequence[float] = (-4.0, 4.0)
) -> RegressionTask:
    """y = a1 sin(w x + b1) + a2 sin(2 w x + b2) (Lacoste et al. 2018, as torchmeta's Harmonic draws it).

    w ~ U[frequency], a1, a2 ~ N(0, 1), b1, b2 ~ U[0, 2 pi]; each task draws its inputs from N(mu, 1),
    mu ~ U[input_mean], so data.x_range does not apply.
    """
    w = rng.uniform(*check_range("frequency", frequency))
    a1, a2 = rng.normal(size=2)
    b1, b2 = rng.uniform(0.0, 2 * math.pi, size=2)
    mu = rng.uniform(*check_range("input_mean", input_mean))
    return RegressionTask(
        function=lambda x: a1 * np.sin(w * x + b1) + a2 * np.sin(2 * w * x + b2),
        inputs=lambda generator, n: generator.normal(mu, 1.0, size=(n, 1)),
    )
