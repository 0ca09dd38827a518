"""What every vector environment here shares: one-line errors for a missing package, simulators reused across vector
environments, and reset()'s per-copy tasks and seeds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalight.errors import ConfigError


def require(package: str, env: str) -> Any:
    """Import `package` (mujoco, metaworld), or a one-line ConfigError naming the `rl` extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"data.env={env} needs the `{package}` package, which is not installed: pip install -e '.[rl]' (make install installs it).") from None


# building a MuJoCo simulator costs milliseconds (a Meta-World arm 0.2 s) and the sampler builds a vector environment
# for every batch of rollouts: the simulators are kept per kind and handed to the next vector environment of that kind.
# Only one vector environment of a kind is stepped at a time in a process (the sampler finishes one batch of rollouts
# before it starts the next), which is all this sharing assumes.
_POOLS: dict[tuple, list[Any]] = {}


def pooled(key: tuple, count: int, build: Callable[[], Any]) -> list[Any]:
    """`count` simulators of kind `key`, reused from earlier vector environments, the missing ones built."""
    pool = _POOLS.setdefault(key, [])
    while len(pool) < count:
        pool.append(build())
    return pool[:count]


def given_tasks(options: dict[str, Any] | None, num_envs: int, task_dim: int = 1) -> Tensor | None:
    """reset()'s options["tasks"] as a tensor [num_envs, task_dim], None when not given; ValueError for another shape."""
    tasks = (options or {}).get("tasks")
    if tasks is None:
        return None
    tasks = torch.as_tensor(tasks)
    if tasks.shape != (num_envs, task_dim):
        raise ValueError(f"tasks of shape {list(tasks.shape)} for {num_envs} environments: give [{num_envs}, {task_dim}]")
    return tasks


def copy_seeds(seed: int | list[int] | None, num_envs: int) -> list[int | None]:
    """reset()'s seed as one seed per copy, as gymnasium's vector environments take it: a list (one each), an int
    (seed + i for copy i) or None (each copy's generator goes on where it was)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != num_envs:
            raise ValueError(f"{len(seed)} seeds for {num_envs} environments: give one each")
        return list(seed)
    return [None if seed is None else seed + i for i in range(num_envs)]
