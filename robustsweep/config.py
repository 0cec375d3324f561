"""Validation of a composed config, and composing one without the CLI.

Two layers of checking, both before any data is read or any MLflow run is created:

1. *Types* — the dataclass schema (robustsweep.core.schema) is the first entry of
   ``conf/config.yaml``'s defaults list, so ``sparsity=abc`` or ``seed=1.5`` fail while Hydra
   composes the config.
2. *Values* — ``validate(cfg)`` checks ranges and cross-key rules. It checks the top-level keys
   itself and asks every component to check its own (data, model, train/objective, prune, defend,
   and each evaluator: attack, checks, attribution). The ``validating`` sweeper
   (``hydra_plugins/robustsweep_sweeper``) calls it on *every* job of a multirun before the first
   job starts; ``run()`` calls it again for single runs.

Every error names the key, the value and what is allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.core.device import check_device
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check, nonnegative_int, number_in, parse_epsilon, positive_int, unlocked
from robustsweep.core.paths import CONF_DIR, resolve_path
from robustsweep.core.registry import is_off
from robustsweep.core.schema import DEPRECATED_PRUNE_KEYS, register_configs
from robustsweep.steps import evaluate
from robustsweep.steps.compress import check_stages
from robustsweep.steps.data import check_data_config
from robustsweep.steps.defend import check_defend_config
from robustsweep.steps.models import check_model_config
from robustsweep.steps.train import check_train_config

__all__ = ["CONF_DIR", "ConfigError", "compose", "compose_and_validate", "parse_epsilon",
           "register_configs", "resolve_path", "validate"]
log = logging.getLogger(__name__)

GROUPS = ("data", "model", "train", "objective", "prune", "defend", "tracking")


def validate(cfg: DictConfig) -> DictConfig:
    """Check every value that the type system cannot; return a normalised copy (``epsilon`` as a
    float, the deprecated ``prune.finetune_*`` keys turned into ``defend``).

    Raises ConfigError naming the first bad key. Touches no data and starts nothing, except
    ``stat`` calls on paths the config names (checkpoint, dataset root) and building a
    ``model._target_`` network on the meta device.
    """
    cfg = cfg.copy()
    # `???` values anywhere except Hydra's own node (whose job.num is only set per job).
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        raise ConfigError(f"{missing[0]} is missing (???) and has no default; allowed: set it, e.g. "
                          f"python -m robustsweep {missing[0]}=<value>"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    for group in GROUPS:
        check(isinstance(cfg.get(group), DictConfig), group, cfg.get(group),
              f"a config group; pick one with {group}=<option>")
    check_added_keys(cfg, task_overrides(cfg))
    _deprecated_finetune(cfg)
    check(0.0 <= cfg.sparsity < 1.0, "sparsity", cfg.sparsity, "a float in [0, 1)")
    norm = str(cfg.attack.get("norm") or "linf") if isinstance(cfg.get("attack"), DictConfig) else "linf"
    written = cfg.epsilon
    with unlocked(cfg):
        cfg.epsilon = parse_epsilon(cfg.epsilon, norm if norm in ("linf", "l2") else "linf")
    if norm == "l2" and (cfg.epsilon < 0.1 or "/255" in str(written)) and cfg.epsilon > 0:
        log.warning("!!! attack.norm=l2 with epsilon=%s (= %.4g): that is an L-inf-sized budget. An L2 "
                    "eps is the perturbation's norm over the whole image: 0.25-1.0 on CIFAR-10, 1-3 on "
                    "MNIST. Meant attack.norm=linf, or epsilon=0.5?", written, cfg.epsilon)
    check_device(cfg.device)  # checks only: the sweeper's process must not claim a worker's GPU

    check_data_config(cfg.data)
    check_model_config(cfg.model, cfg)
    check_train_config(cfg)
    check_stages(cfg)  # prune, BatchNorm recalibration, quantize, and any other stage's own checks
    check_defend_config(cfg)
    evaluate.check_config(cfg)
    if cfg.get("efficiency") is not None:
        nonnegative_int(cfg, "efficiency.warmup")
        positive_int(cfg, "efficiency.min_repeats")
        number_in(cfg, "efficiency.min_seconds", 0.0, 600.0, "seconds in [0, 600]")
    check(bool(cfg.tracking.experiment), "tracking.experiment", cfg.tracking.experiment,
          "a non-empty MLflow experiment name")
    return cfg


def task_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides of this job: from the config's own ``hydra`` node (a sweeper's
    composed job) or Hydra's global state (a single run). Empty outside Hydra (``compose()``)."""
    if isinstance(cfg.get("hydra"), DictConfig):
        return [str(o) for o in cfg.hydra.overrides.get("task", [])]
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def check_added_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a key that ``+key=value`` (or ``++key=value``) adds but nothing declares. Hydra refuses
    ``sparsty=0.5`` and then advises ``+sparsty=0.5``, which ran with the defaults; so did
    ``+attack.stepz=5``. Declared are: the schema's top-level keys and config groups; in a group
    node, the chosen option's own keys, an explicit parameter of the registered plug-in it names, or,
    for a ``_target_`` callable, any of its parameters (all of them if it takes ``**kwargs``)."""
    import difflib
    import inspect

    from robustsweep.core.registry import TARGET, Registry
    from robustsweep.core.schema import Config

    top = {*Config.__dataclass_fields__, "hydra"}
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}  # a plug-in's new group is in ``top``
    # each +key=value override -> its key
    added = {o: o.lstrip("+").split("=", 1)[0].strip() for o in overrides if o.startswith("+")}
    for o, key in added.items():
        head, _, rest = key.partition(".")
        if head == "hydra" or head.startswith("hydra/") or (not rest and key in groups | top):
            continue  # Hydra's own node; a config group picked with +group=option; a schema key
        if not rest:
            near = difflib.get_close_matches(key, sorted(top | groups), n=1)
            raise ConfigError(f"{o}: {key!r} is not a key robustsweep knows"
                              + (f" (did you mean {near[0]}?)" if near else "")
                              + f"; allowed: {', '.join(sorted(top - {'hydra'}))}")
        node = cfg.get(head)
        sub = rest.split(".", 1)[0]
        if not isinstance(node, DictConfig) or sub == TARGET:
            continue  # a typed node (checks, perf, ...): Hydra's schema has checked it already
        own = {k for k in node if f"{head}.{k}" not in added.values()}
        if sub in own:
            continue
        registry = Registry.BY_GROUP.get(head)
        params: dict[str, inspect.Parameter] = {}
        if registry is not None:
            try:
                params = dict(inspect.signature(registry.resolve(node)).parameters)
            except (ConfigError, TypeError, ValueError):
                continue  # an unknown plug-in name is the registry's own error, reported next
        free = bool(node.get(TARGET)) and any(p.kind is p.VAR_KEYWORD for p in params.values())
        # a parameter with a default is a setting (pgd's steps); one without is what the framework
        # passes (the model, eps, the prune targets)
        named = {n for n, p in params.items() if p.default is not p.empty}
        if free or sub in named:
            continue
        near = difflib.get_close_matches(sub, sorted(own | named), n=1)
        what = node.get(TARGET) or node.get(registry.key if registry else "name")
        allowed = ", ".join(f"{head}.{k}" for k in sorted(own | named))
        raise ConfigError(f"{o}: {head}.{sub} is not a key of {head}={what}"
                          + (f" (did you mean {head}.{near[0]}?)" if near else "")
                          + f"; allowed: {allowed}, or a callable {head}._target_ that takes it")


def _deprecated_finetune(cfg: DictConfig) -> None:
    """``prune.finetune_epochs=N prune.finetune_lr=X`` (before the defend group) means
    ``defend=clean defend.epochs=N defend.lr=X``: rewritten in place, with a warning, so both
    spellings are the same cell."""
    old = {k: cfg.prune.get(k) for k in DEPRECATED_PRUNE_KEYS}
    with unlocked(cfg):
        for k in DEPRECATED_PRUNE_KEYS:
            cfg.prune.pop(k, None)
    if all(v is None for v in old.values()):
        return
    epochs, lr = old["finetune_epochs"], old["finetune_lr"]
    log.warning("prune.finetune_epochs / prune.finetune_lr are deprecated: use defend=clean "
                "defend.epochs=%s defend.lr=%s (the same cell)", epochs, lr if lr is not None else 0.01)
    check(epochs is None or (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0),
          "prune.finetune_epochs", epochs, "an integer >= 0 (deprecated: defend.epochs)")
    check(lr is None or (isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0),
          "prune.finetune_lr", lr, "a number > 0 (deprecated: defend.lr)")
    if not epochs:
        return
    check(is_off(cfg.defend), "prune.finetune_epochs", epochs,
          f"only one fine-tune: drop it and keep defend={cfg.defend.get('name')!r} (defend.epochs)")
    with unlocked(cfg):
        cfg.defend = {"name": "clean", "epochs": epochs, "lr": lr if lr is not None else 0.01}


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config as the CLI would, without running anything (tests, notebooks).

    Resolves ``${hydra:...}`` interpolations by returning the config with ``hydra`` kept.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def compose_and_validate(config_loader: Any, master_config: DictConfig,
                         jobs: Iterable[Sequence[str]]) -> tuple[list[DictConfig], list[str]]:
    """Compose each job's config as Hydra's launcher will and run ``validate`` on it.

    Returns the validated configs and one ``job [overrides]: message`` line per invalid job, so a
    sweeper can refuse the whole sweep before the first job starts."""
    cfgs, errors = [], []
    for overrides in jobs:
        cfg = config_loader.load_sweep_config(master_config=master_config, sweep_overrides=list(overrides))
        try:
            cfgs.append(validate(cfg))
        except ConfigError as e:
            errors.append(f"job [{' '.join(overrides)}]: {e}")
    return cfgs, errors
