"""Checks of a composed config that Hydra cannot do itself, so a bad value fails before anything is built."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from metalight.errors import ConfigError

# key -> smallest allowed whole number. Keys left unset (null) are skipped: their owners fall back to a
# documented default.
_INT_MINIMUMS = {
    "seed": 0,
    "data.n_way": 1,
    "data.k_shot": 1,
    "data.k_query": 1,
    "data.n_way_train": 1,
    "data.k_shot_train": 1,
    "data.k_query_train": 1,
    "data.meta_batch_size": 1,
    "data.batch_size": 1,
    "data.eval_batch_size": 1,
    "data.batches_per_epoch": 1,
    "data.n_val_tasks": 1,
    "data.n_test_tasks": 1,
    "data.image_size": 1,
    "data.num_workers": 0,
    "algo.inner_steps": 0,
    "algo.eval_inner_steps": 0,
    "algo.msl_epochs": 0,
    "algo.da_epochs": 0,
    "trainer.max_steps": -1,
    "trainer.max_epochs": -1,
    "trainer.log_every_n_steps": 1,
    "trainer.num_nodes": 1,
}
_POSITIVE_FLOATS = ("algo.inner_lr", "algo.eval_inner_lr", "algo.meta_lr", "algo.optimizer.lr")


def _value(cfg: DictConfig, key: str) -> object:
    return OmegaConf.select(cfg, key, default=None)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, the value and the fix for the first out-of-range setting."""
    for key, smallest in _INT_MINIMUMS.items():
        value = _value(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ConfigError(
                f"{key}={value!r} is not valid: it must be a whole number >= {smallest}. "
                f"Set it on the command line, e.g. `{key}={max(smallest, 1)}`."
            )
    for key in _POSITIVE_FLOATS:
        value = _value(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key}={value!r} is not valid: it must be a number > 0, e.g. `{key}=0.4`.")
    world = _world_size(cfg)
    key = "data.batch_size" if _value(cfg, "data.train_mode") == "flat" else "data.meta_batch_size"
    batch = _value(cfg, key)
    if isinstance(batch, int) and batch % world:
        raise ConfigError(
            f"{key}={batch} does not split evenly over {world} processes "
            f"(trainer.devices x trainer.num_nodes): choose a multiple of {world}."
        )
    _check_epoch_schedules(cfg)
    _check_partials(cfg)
    _check_task_kind(cfg)
    _check_modality(cfg)
    _check_train_mode(cfg)


def _target_class(cfg: DictConfig, group: str) -> type | None:
    """The class `<group>._target_` names, or None when it names none or cannot be imported (instantiating it says why)."""
    target = _value(cfg, f"{group}._target_")
    try:
        return get_class(target) if isinstance(target, str) else None
    except ImportError:
        return None


def _check_task_kind(cfg: DictConfig) -> None:
    """The learner must take the data's kind of task (ProtoNets and Baseline classify; regression needs a gradient-based learner)."""
    algorithm, data = _target_class(cfg, "algo"), _target_class(cfg, "data")
    kind = getattr(data, "kind", None)
    if algorithm is not None and hasattr(algorithm, "check_task_kind") and kind is not None:
        algorithm.check_task_kind(kind)
    if kind is not None and kind.name == "regression" and OmegaConf.is_missing(cfg.data, "family"):
        raise ConfigError("data.family is not set: give data.family=<package.module.function> (README, Regression), or use data=sinusoid.")


def _check_modality(cfg: DictConfig) -> None:
    """Images go to image networks, token ids to text encoders (a model's `modality`: "text", or images when it has none),
    and to learners that take them (a learner's `modalities`, when it names them): a mismatch would fail deep inside a forward."""
    model, data, algorithm = (_target_class(cfg, group) for group in ("model", "data", "algo"))
    if model is None or data is None:
        return
    given, taken = getattr(data, "modality", None), getattr(model, "modality", "images")
    data_name, model_name = _value(cfg, "data._target_"), _value(cfg, "model._target_")
    if given is None and taken == "text":
        raise ConfigError(
            f"model={model_name} is a text encoder (token ids in), but the data ({data_name}) gives no text: use a model of its "
            "kind (model=mlp for regression, the RL configs' own), or text data (data=banking77, hwu64, liu, clinc150, text)."
        )
    if given is not None and given != taken:
        fix = "a text encoder: model=text_bag or model=text_cnn" if given == "text" else "an image network: model=conv4, conv4_mini, resnet12 or timm"
        raise ConfigError(f"model={model_name} takes {taken}, but the data ({data_name}) gives {given}: use {fix}.")
    wanted = getattr(algorithm, "modalities", None) if algorithm is not None else None
    if given is not None and wanted is not None and given not in wanted:
        raise ConfigError(
            f"algo={_value(cfg, 'algo._target_')} takes {' and '.join(wanted)} only, but the data ({data_name}) gives {given}: "
            "use another learner (algo=protonet, matchingnet, maml, anil, baseline, ...)."
        )
    if given == "text" and (_value(cfg, "algo.finetune_steps") or 0) > 0:
        raise ConfigError("algo.finetune_steps fine-tunes on flipped and shifted copies of the support images, which text has none of: set algo.finetune_steps=0.")


def _check_train_mode(cfg: DictConfig) -> None:
    """The training batches the data module gives (data.train_mode) must be those the algorithm trains on."""
    target, mode = _value(cfg, "algo._target_"), _value(cfg, "data.train_mode") or "episodes"
    try:
        wanted = getattr(get_class(target), "train_mode", "episodes") if isinstance(target, str) else "episodes"
    except ImportError:
        return  # instantiating the algorithm names the bad target
    if mode != wanted:
        raise ConfigError(
            f"data.train_mode={mode} but the algorithm ({target}) trains on {wanted}: set data.train_mode={wanted} "
            "(algo=baseline sets flat by itself; an experiment= file written for another algorithm may have changed it)."
        )


def _check_epoch_schedules(cfg: DictConfig) -> None:
    """MAML++'s MSL and DA phases (algo.msl_epochs, algo.da_epochs) must end within the run."""
    steps, per_epoch = _value(cfg, "trainer.max_steps"), _value(cfg, "data.batches_per_epoch")
    if not isinstance(steps, int) or steps <= 0 or not isinstance(per_epoch, int) or per_epoch <= 0:
        return
    epochs = -(-steps // per_epoch)
    for switch, key in (("algo.msl", "algo.msl_epochs"), ("algo.da", "algo.da_epochs")):
        value = _value(cfg, key)
        if _value(cfg, switch) is True and isinstance(value, int) and value > epochs:
            raise ConfigError(
                f"{key}={value} reaches beyond the run, which has {epochs} epochs (trainer.max_steps={steps} / "
                f"data.batches_per_epoch={per_epoch}): set {key} to at most {epochs}, or train longer."
            )


def _check_partials(cfg: DictConfig) -> None:
    """algo.optimizer / algo.scheduler keys over a learner whose own is null name no class to build (`algo=reptile algo.optimizer.lr=...`)."""
    for name in ("optimizer", "scheduler"):
        node = _value(cfg, f"algo.{name}")
        if isinstance(node, DictConfig) and "_target_" not in node:
            raise ConfigError(
                f"algo.{name} sets {', '.join(map(str, node.keys()))} but names no class: this learner's {name} is null by default "
                f"(its own, e.g. Reptile's SGD at algo.meta_lr). Drop the algo.{name}.* keys, or name one: "
                f"+algo.{name}._target_=torch.optim.Adam +algo.{name}._partial_=true."
            )


def _world_size(cfg: DictConfig) -> int:
    """Processes a run will use, when the config says so plainly (an int number of devices)."""
    devices = _value(cfg, "trainer.devices")
    nodes = _value(cfg, "trainer.num_nodes") or 1
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif OmegaConf.is_list(devices):
        per_node = len(devices)
    else:  # "auto" or -1: only known once the trainer looks at the machine
        per_node = 1
    return per_node * int(nodes)
