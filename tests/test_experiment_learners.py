"""A quick experiment with another learner of its task kind (`python train.py experiment=quick_sinusoid algo=reptile`)
builds, or stops in one line that names the key to change: every pair composed and built, nothing trained."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from metalight.errors import MetalightError
from metalight.runs.checkpoints import saved_run_config
from metalight.runs.learner_swap import fit_experiment_to_learner
from metalight.runs.training import build_data_and_algorithm
from metalight.tasks.kinds import KINDS

CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK = sorted(path.stem for path in (CONF / "experiment").glob("quick_*.yaml"))
LEARNERS = sorted(path.stem for path in (CONF / "algo").glob("*.yaml"))

# the pairs that refuse, and what their one line names: a learner that cannot take the experiment's model or
# input (MAML++'s per-step BatchNorm on a network without BatchNorm, RL^2 on a feed-forward policy, images-only
# Relation Networks on text, SNAIL's fixed sequence length); every other pair must build
REFUSED = {
    ("quick_sinusoid", "mamlpp"): "algo.bnrs=false",
    ("quick_sinusoid_cnp", "mamlpp"): "algo.bnrs=false",
    ("quick_sinusoid_pretrained", "mamlpp"): "algo.bnrs=false",
    ("quick_banking77", "mamlpp"): "algo.bnrs=false",
    ("quick_banking77", "relationnet"): "takes images only",
    ("quick_banking77", "snail"): "data.n_way",
    ("quick_omniglot_protonet", "snail"): "data.n_way",
    ("quick_omniglot_reptile", "snail"): "data.n_way",
    ("quick_navigation2d", "rl2"): "model=gaussian_gru",
    ("quick_navigation2d_pretrained", "rl2"): "model=gaussian_gru",
    ("quick_navigation2d_random", "rl2"): "model=gaussian_gru",
    ("quick_navigation2d_rl2", "fomaml_rl"): "model.in_features",
    ("quick_navigation2d_rl2", "maml_ppo"): "model.in_features",
    ("quick_navigation2d_rl2", "maml_rl"): "model.in_features",
    # the experiment picks MAML-RL's outer-step group (algo/optimizer=adam), which these learners do not have:
    # Hydra stops composing with one line naming the group
    ("quick_navigation2d_pretrained_adam", "maml_ppo"): "algo/optimizer",
    ("quick_navigation2d_pretrained_adam", "rl2"): "algo/optimizer",
    # GrBAL's dynamics tasks need a dynamics model: CNP brings its own network, which takes no model.hidden (and,
    # without it, stops naming model=dynamics_mlp: tests/test_grbal.py); MAML++'s per-step BatchNorm needs BatchNorm
    ("quick_grbal", "cnp"): "model.hidden",
    ("quick_grbal", "mamlpp"): "algo.bnrs=false",
}


def _learner_kinds(name: str) -> tuple[str, ...]:
    """The task kinds of conf/algo/<name>.yaml's class, read from the file (or the file it extends): no composition."""
    node = OmegaConf.load(CONF / "algo" / f"{name}.yaml")
    target = node.get("_target_") or OmegaConf.select(node, "algo._target_")
    if target is None:
        return _learner_kinds(next(entry for entry in node.defaults if isinstance(entry, str)))
    return tuple(getattr(get_class(target), "task_kinds", tuple(KINDS)))


@pytest.mark.parametrize("experiment", QUICK)
def test_every_learner_of_its_kind_builds_or_names_the_key(experiment, compose_generated):
    kind = get_class(compose_generated(f"experiment={experiment}").data._target_).kind.name
    tried = [learner for learner in LEARNERS if kind in _learner_kinds(learner)]
    for learner in tried:
        refusal = REFUSED.get((experiment, learner))
        try:
            build_data_and_algorithm(compose_generated(f"experiment={experiment}", f"algo={learner}"))
        except (MetalightError, ConfigCompositionException) as error:
            line = str(error)
            assert refusal is not None, f"experiment={experiment} algo={learner} stops: {line}"
            assert "\n" not in line and refusal in line, line
        else:
            assert refusal is None, f"experiment={experiment} algo={learner} was expected to stop naming {refusal}"
    assert tried, f"no learner takes {experiment}'s {kind} tasks"


def test_an_experiments_keys_for_its_own_learner_are_left_out_for_another(compose_generated, caplog):
    cfg = compose_generated("experiment=quick_sinusoid", "algo=cnp", "algo.gradient_clip_val=1.0")
    assert {"inner_lr", "inner_steps", "eval_inner_steps"} <= set(cfg.algo)  # MAML's, from sinusoid_finn
    dropped = fit_experiment_to_learner(cfg, ["experiment=quick_sinusoid", "algo=cnp", "algo.gradient_clip_val=1.0"])
    assert set(dropped) == {"algo.inner_lr", "algo.inner_steps", "algo.eval_inner_steps"} and "left out" in caplog.text
    assert cfg.algo.gradient_clip_val == 1.0 and cfg.algo.optimizer.lr == 0.001  # the command line's key and a key CNP takes stay
    reptile = compose_generated("experiment=quick_sinusoid", "algo=reptile")
    assert dict(reptile.algo.optimizer) == {"lr": 0.001}  # MAML's Adam LR over Reptile's null optimizer: no class to build
    fit_experiment_to_learner(reptile, ["experiment=quick_sinusoid", "algo=reptile"])
    assert reptile.algo.optimizer is None
    mamlpp = compose_generated("experiment=quick_omniglot", "algo=mamlpp")
    fit_experiment_to_learner(mamlpp, ["experiment=quick_omniglot", "algo=mamlpp"])
    assert mamlpp.algo.msl_epochs == -(-mamlpp.trainer.max_steps // mamlpp.data.batches_per_epoch)  # within the quick run
    # without a learner on the command line nothing is left out; a key set there is never left out
    kept = compose_generated("experiment=quick_sinusoid", "algo=cnp", "algo.inner_lr=0.5")
    assert fit_experiment_to_learner(kept, ["experiment=quick_sinusoid"]) == []
    fit_experiment_to_learner(kept, ["experiment=quick_sinusoid", "algo=cnp", "algo.inner_lr=0.5"])
    assert kept.algo.inner_lr == 0.5


def test_an_optimizer_key_without_a_class_is_one_line(compose_generated):
    cfg = compose_generated("data=sinusoid", "algo=reptile", "+algo.optimizer.lr=0.1")
    with pytest.raises(MetalightError, match=r"algo.optimizer sets lr but names no class"):
        build_data_and_algorithm(cfg)


@pytest.mark.slow
def test_quick_sinusoid_runs_with_reptile(train_py_in_process, tmp_path):
    status, output = train_py_in_process(
        tmp_path, tmp_path / "logs", "experiment=quick_sinusoid", "algo=reptile", "trainer.max_steps=2", "data.n_val_tasks=2",
        "data.n_test_tasks=2", "data.batches_per_epoch=2", "algo.eval_inner_steps=2", "logger=csv",
    )
    assert status == 0, output[-2000:]
    assert "left out algo.optimizer" in output
    # eval.py and FewShotLearner rebuild the run from its folder: the same keys are left out again
    checkpoint = next((tmp_path / "logs").glob("quick_sinusoid/runs/*/checkpoints/last.ckpt"))
    _, algorithm = build_data_and_algorithm(saved_run_config(checkpoint))
    assert type(algorithm).__name__ == "Reptile"
