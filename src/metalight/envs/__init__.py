"""The environments RL tasks run in, each a gymnasium VectorEnv of copies stepped together (data.env names one).

metalight.tasks keeps the task interface (kinds, data modules, samplers); this package holds the worlds: 2-D
navigation (navigation.py), MuJoCo's HalfCheetah (halfcheetah.py) and its changing bodies (bodies.py), Meta-World's
arms (meta_world.py). An environment class says its observation_dim, action_dim and task_dim, draws a task of a split
from a generator (draw_task(rng, split=...)), checks its options (check_options: one-line ConfigErrors) and is built
as cls(num_envs, horizon=..., **data.env_options). The classes are imported only when named: MuJoCo and Meta-World
come with the `rl` extra.
"""

from __future__ import annotations

import importlib

# data.env -> the class, as module:name under metalight.envs
ENVIRONMENTS = {
    "navigation2d": "navigation:Navigation2DEnv",
    "halfcheetah_dir": "halfcheetah:HalfCheetahDirection",
    "halfcheetah_vel": "halfcheetah:HalfCheetahVelocity",
    "halfcheetah_cripple": "bodies:HalfCheetahCripple",
    "halfcheetah_rand_params": "bodies:HalfCheetahRandParams",
    "point_robot": "point_robot:PointRobot",
    "metaworld": "meta_world:MetaWorld",
}
KNOWN_ENVIRONMENTS = tuple(ENVIRONMENTS)


def environment_class(name: str) -> type:
    """The environment class data.env=`name` names; KeyError for an unknown name, ImportError when its extra is missing."""
    module, _, attribute = ENVIRONMENTS[name].partition(":")
    return getattr(importlib.import_module(f"metalight.envs.{module}"), attribute)
