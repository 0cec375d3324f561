"""Config schema, epsilon parsing and validation.

Two layers of checking, both before any data is read or any MLflow run is created:

1. *Types* — the dataclass ``Config`` is registered in Hydra's ConfigStore as ``base_config`` and
   is the first entry of ``conf/config.yaml``'s defaults list, so ``sparsity=abc`` or
   ``seed=1.5`` fail while Hydra composes the config.
2. *Values* — ``validate(cfg)`` checks ranges and cross-key rules (sparsity in [0, 1), eps in
   [0, 1], ``8/255`` fractions, checkpoint files, known attack/prune names...). The
   ``validating`` sweeper (``hydra_plugins/robustsweep_sweeper``) calls it on *every* job of a
   multirun before the first job starts; ``run()`` calls it again for single runs.

Every error names the key, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import torch

CONF_DIR = (
    Path(__file__).parent / "conf"  # installed wheel: configs ship as robustsweep/conf
    if (Path(__file__).parent / "conf").is_dir()
    else Path(__file__).parent.parent / "conf"  # source tree / editable install: <repo>/conf
)


class ConfigError(ValueError):
    """A configuration value is invalid. The message names key, value and what is allowed."""


@dataclass
class PathsConfig:
    # Relative paths are resolved against the directory the command was launched from.
    output_dir: str = "outputs"


class Sampler(Enum):
    bisection = "bisection"  # 1-D monotone: halves the bracket (robustsweep.search.BisectionSampler)
    tpe = "tpe"  # Optuna TPE with the safety criterion as a constraint
    gp = "gp"  # Optuna's Gaussian-process sampler, same constraint
    random = "random"


class Criterion(Enum):
    asr = "asr"
    robust_acc = "robust_acc"


class Direction(Enum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class SearchConfig:
    """``search=cliff``: an Optuna study over Hydra jobs (hydra_plugins/robustsweep_optuna).

    The searched keys and ranges live in ``hydra.sweeper.params`` (or on the command line,
    ``sparsity=interval(0,0.99)``); these keys say what to optimise and how.
    """

    param: str = "sparsity"  # the key whose cliff is located
    reference: float = 0.0  # value of `param` for the dense reference (trial 0)
    criterion: Optional[Criterion] = Criterion.asr  # noqa: UP045 ; null = plain optimisation
    delta: float = 0.10  # safe: criterion worsens by at most this (fraction, 0..1)
    delta_acc: float = 0.05  # safe: clean accuracy falls by at most this (fraction, 0..1)
    objective: str = "sparsity"  # a searched key or a metric the job returns
    direction: Direction = Direction.maximize
    sampler: Sampler = Sampler.bisection
    n_trials: int = 20  # total over all launches of the study (a relaunch continues to it)
    n_jobs: int = 1  # trials launched together (Hydra launcher batch)
    tol: float = 0.01  # bisection stops when the bracket is this narrow
    max_failure_rate: float = 0.25  # of n_trials; more failed trials stop the study
    storage: Optional[str] = None  # noqa: UP045 ; null = journal file under paths.output_dir
    study_name: Optional[str] = None  # noqa: UP045 ; null = derived from the fixed overrides
    seed: int = 0  # sampler seed


@dataclass
class ChecksConfig:
    """Sanity checks of every cell's attack result (robustsweep.checks; README "What we check")."""

    sanity: bool = True  # eps=0, eps=1, PGD vs FGSM, PGD vs noise on n_probe correct images
    n_probe: int = 64  # images the per-cell sanity checks attack (first correct eval images)
    tol: float = 0.05  # ASR slack for PGD >= FGSM and for "ASR does not fall as eps grows"


class Amp(Enum):
    none = "none"  # float32 throughout
    bf16 = "bf16"  # bfloat16 autocast for attacks and evaluation (IG stays float32)


@dataclass
class PerfConfig:
    """How fast, never what: results are the same with any of these (amp aside; see README
    "Performance"). ``perf.amp`` is part of a cell's identity, the rest is not."""

    # Share across the jobs of one process what does not depend on the cell: pruned models,
    # clean predictions, FGSM directions, clean IG maps (robustsweep.reuse); all keyed by content.
    reuse: bool = True
    amp: Amp = Amp.none
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its convolution algorithms once per shape


@dataclass
class Config:
    """Top-level keys. Group nodes (data, model, ...) are plain YAML under conf/<group>/."""

    sparsity: float = 0.0
    # A float, or a fraction as written in papers ("8/255"); parsed by parse_epsilon().
    epsilon: Union[float, int, str] = "8/255"  # noqa: UP007  (OmegaConf needs typing.Union)
    seed: int = 0
    device: str = "auto"
    data: Any = None
    model: Any = None
    train: Any = None
    prune: Any = None
    attack: Any = None
    attribution: Any = None
    tracking: Any = None
    search: Optional[SearchConfig] = None  # noqa: UP045 ; set by search=cliff
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs() -> None:
    """Register the schema (idempotent; Hydra's ConfigStore replaces same-named nodes)."""
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()


# ----------------------------------------------------------------------------------- epsilon
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_epsilon(value: float | int | str) -> float:
    """Return eps in [0, 1] pixel units from ``0.031``, ``"0.031"`` or ``"8/255"``."""
    allowed = "a number in [0, 1] (pixel units) or a fraction a/b such as 8/255"
    if isinstance(value, bool):
        raise ConfigError(f"epsilon={value!r} is not valid; allowed: {allowed}")
    if isinstance(value, int | float):
        eps = float(value)
    else:
        text = str(value).strip()
        match = _FRACTION.match(text)
        if match:
            num, den = float(match.group(1)), float(match.group(2))
            if den == 0:
                raise ConfigError(
                    f"epsilon={text!r} divides by zero; allowed: {allowed}"
                )
            eps = num / den
        else:
            try:
                eps = float(text)
            except ValueError:
                raise ConfigError(f"epsilon={text!r} is not a number; allowed: {allowed}") from None
    if not (0.0 <= eps <= 1.0) or eps != eps:
        raise ConfigError(f"epsilon={value!r} (= {eps:g}) is outside [0, 1]; allowed: {allowed}")
    return eps


# -------------------------------------------------------------------------------- validation
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {allowed}")


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        key, value, "an integer > 0",
    )


# Images per attack batch for attack.batch_size=auto (measured, README "Performance"): a 2-core CPU
# runs forward + input-gradient fastest at 64-128 (and 500 holds ~2.4 GB of activations for
# ResNet-20); a GPU needs large batches to fill.
AUTO_BATCH = {"cpu": 128, "cuda": 1024}


def amp_name(cfg: DictConfig) -> str:
    """``perf.amp`` as its name ("none", "bf16"): the schema makes it an ``Amp``, YAML a string."""
    amp = cfg.perf.amp if cfg.get("perf") is not None else "none"
    return amp.value if isinstance(amp, Amp) else str(amp)


def attack_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """``attack.batch_size``, with ``auto`` resolved for ``device``."""
    bs = cfg.attack.batch_size
    return AUTO_BATCH.get(device.type, 128) if bs == "auto" else int(bs)


def resolve_path(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Resolve a user path against the launch directory (Hydra's original cwd)."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (base or launch_dir()) / p


def launch_dir() -> Path:
    """The directory the command was launched from, even if Hydra changed into a job dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU. Asking for a device that is absent is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA GPU is available here; allowed: auto, cpu")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here; allowed: auto, cpu")
    return torch.device(name)


def _number_in(cfg: DictConfig, key: str, lo: float, hi: float, allowed: str,
               low_open: bool = False, high_open: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > lo if low_open else value >= lo) and (value < hi if high_open else value <= hi)
    _check(ok, key, value, allowed)


def validate(cfg: DictConfig) -> DictConfig:
    """Check every value that the type system cannot; return a copy with ``epsilon`` as float.

    Raises ConfigError naming the first bad key. Touches no data and starts nothing, except
    ``stat`` calls on paths the config names (checkpoint, dataset root).
    """
    # Imported here: registries live next to the code they name, which imports torch.
    from robustsweep.attacks import ATTACKS
    from robustsweep.data import DATASETS, check_data_config
    from robustsweep.models import MODELS
    from robustsweep.prune import PRUNE_METHODS

    cfg = cfg.copy()
    # `???` values anywhere except Hydra's own node (whose job.num is only set per job).
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        raise ConfigError(f"{missing[0]} is missing (???) and has no default; allowed: set it, e.g. "
                          f"python -m robustsweep {missing[0]}=<value>"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    sparsity = cfg.sparsity
    _check(0.0 <= sparsity < 1.0, "sparsity", sparsity, "a float in [0, 1)")
    with _unlocked(cfg):
        cfg.epsilon = parse_epsilon(cfg.epsilon)
    _check(bool(DEVICE_RE.match(str(cfg.device))), "device", cfg.device, "auto, cpu, cuda, cuda:N, mps")
    resolve_device(cfg.device)

    for group in ("data", "model", "train", "prune", "attack", "attribution", "tracking"):
        _check(isinstance(cfg.get(group), DictConfig), group, cfg.get(group),
               f"a config group; pick one with {group}=<option>")

    _check(cfg.data.name in DATASETS, "data.name", cfg.data.name, ", ".join(sorted(DATASETS)))
    check_data_config(cfg.data)
    _check(cfg.model.name in MODELS, "model.name", cfg.model.name, ", ".join(sorted(MODELS)))
    ckpt = cfg.model.get("checkpoint")
    if ckpt:
        path = resolve_path(ckpt)
        _check(path.is_file(), "model.checkpoint", str(ckpt),
               f"an existing .safetensors/.pt file (looked for {path})")

    _positive_int(cfg, "train.epochs")
    _positive_int(cfg, "train.batch_size")
    _number_in(cfg, "train.lr", 0.0, math.inf, "a number > 0", low_open=True)
    _number_in(cfg, "train.weight_decay", 0.0, math.inf, "a number >= 0")
    _number_in(cfg, "train.warmup_fraction", 0.0, 1.0, "a number in (0, 1)", low_open=True,
               high_open=True)
    _number_in(cfg, "train.label_smoothing", 0.0, 1.0, "a number in [0, 1)", high_open=True)
    crop = cfg.train.crop_pad
    _check(isinstance(crop, int) and not isinstance(crop, bool) and crop >= 0, "train.crop_pad",
           crop, "an integer >= 0 (pixels)")
    _check(isinstance(cfg.train.flip, bool), "train.flip", cfg.train.flip, "true or false")
    _number_in(cfg, "prune.finetune_lr", 0.0, math.inf, "a number > 0", low_open=True)

    _check(cfg.prune.method in PRUNE_METHODS, "prune.method", cfg.prune.method,
           ", ".join(sorted(PRUNE_METHODS)))
    ft = cfg.prune.finetune_epochs
    _check(isinstance(ft, int) and ft >= 0, "prune.finetune_epochs", ft, "an integer >= 0")
    bad_layers = set(cfg.prune.layers) - {"conv", "linear"}
    _check(not bad_layers and len(cfg.prune.layers) > 0, "prune.layers",
           list(cfg.prune.layers), "a non-empty subset of [conv, linear]")

    _check(cfg.attack.name in ATTACKS, "attack.name", cfg.attack.name, ", ".join(sorted(ATTACKS)))
    if cfg.attack.batch_size != "auto":
        bs = cfg.attack.batch_size
        _check(isinstance(bs, int) and not isinstance(bs, bool) and bs > 0, "attack.batch_size", bs,
               "auto (128 on CPU, 1024 on CUDA) or an integer > 0")
    if cfg.attack.name == "pgd":
        _positive_int(cfg, "attack.steps")
        _check(isinstance(cfg.attack.get("early_stop", False), bool), "attack.early_stop",
               cfg.attack.get("early_stop"), "true or false")
        step = cfg.attack.step_size
        if step is not None:
            allowed = "null (= 2.5*eps/steps, Madry et al.) or a step in (0, 1], e.g. 2/255"
            try:
                value = parse_epsilon(step)
            except ConfigError:
                value = -1.0
            _check(0 < value <= 1, "attack.step_size", step, allowed)
            # A step larger than the ball is clipped back every step: PGD degenerates into
            # projected sign noise. Almost always a mix-up of eps and step (2/255 vs 8/255).
            _check(value <= cfg.epsilon or cfg.epsilon == 0, "attack.step_size", step,
                   f"a step <= epsilon ({cfg.epsilon:.6g}); or null to scale with epsilon "
                   f"(2.5*eps/steps)")

    n_img = cfg.attribution.n_images
    _check(isinstance(n_img, int) and n_img >= 0, "attribution.n_images", n_img, "an integer >= 0")
    if n_img > 0:
        _positive_int(cfg, "attribution.n_steps")
        _positive_int(cfg, "attribution.internal_batch_size")
        _check(cfg.attribution.baseline in ("black", "white", "gray"), "attribution.baseline",
               cfg.attribution.baseline, "black, white, gray")
        cap = cfg.attribution.get("max_n_steps")
        _check(cap is None or (isinstance(cap, int) and cap >= cfg.attribution.n_steps),
               "attribution.max_n_steps", cap,
               f"null (no doubling) or an integer >= attribution.n_steps ({cfg.attribution.n_steps})")
    _check(cfg.checks.n_probe >= 0, "checks.n_probe", cfg.checks.n_probe, "an integer >= 0")
    _number_in(cfg, "checks.tol", 0.0, 1.0, "a number in [0, 1]")
    _check(bool(cfg.tracking.experiment), "tracking.experiment", cfg.tracking.experiment,
           "a non-empty MLflow experiment name")
    return cfg


@contextlib.contextmanager
def _unlocked(cfg: DictConfig) -> Iterator[DictConfig]:
    """Temporarily lift struct/readonly flags to write a normalised value."""
    struct, readonly = OmegaConf.is_struct(cfg), OmegaConf.is_readonly(cfg)
    OmegaConf.set_struct(cfg, False)
    OmegaConf.set_readonly(cfg, False)
    try:
        yield cfg
    finally:
        OmegaConf.set_struct(cfg, struct)
        OmegaConf.set_readonly(cfg, readonly)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config as the CLI would, without running anything (tests, notebooks).

    Resolves ``${hydra:...}`` interpolations by returning the config with ``hydra`` kept.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
