"""The typed config schema, registered in Hydra's ConfigStore as ``base_config``.

It is the first entry of ``conf/config.yaml``'s defaults list, so ``sparsity=abc`` or ``seed=1.5``
fail while Hydra composes the config. Value checks (ranges, cross-key rules) come after, in
``robustsweep.config.validate``, which asks each component to check its own keys.

Group nodes (data, model, prune, attack, ...) are plain YAML under ``conf/<group>/``: each may
name a registered plug-in (``name:``/``method:``) or any importable callable (``_target_:``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from robustsweep.core import plugins
from robustsweep.core.paths import CONF_DIR

# Fine-tuning after compression lived in prune.* until the `defend` group replaced it. The old
# keys stay accepted (robustsweep.config normalises them into `defend` with a deprecation warning,
# the same cell id as the new spelling); they default to null here so that no prune YAML carries them.
DEPRECATED_PRUNE_KEYS = ("finetune_epochs", "finetune_lr")


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
    heartbeat_interval: int = 10  # s; RDB storage: each launcher's running trials beat this often
    grace_period: int = 60  # s without a beat: the trial's launcher is gone (RDB storage)
    study_name: Optional[str] = None  # noqa: UP045 ; null = derived from the fixed overrides
    seed: int = 0  # sampler seed


@dataclass
class ChecksConfig:
    """Sanity checks of every cell's attack result (the `sanity` evaluator; README "What we check")."""

    sanity: bool = True  # eps=0, eps=1, PGD vs FGSM, PGD vs noise on n_probe correct images
    n_probe: int = 64  # images the per-cell sanity checks attack (first correct eval images)
    tol: float = 0.05  # ASR slack for PGD >= FGSM and for "ASR does not fall as eps grows"


@dataclass
class EfficiencyConfig:
    """How each compressed model's size, FLOPs and latency are measured (robustsweep.steps.efficiency).
    Not part of a cell's identity: latency is a property of the machine, not of the cell."""

    latency: bool = True  # time forward passes at batch 1 and 64 (off: latency_ms_* not logged)
    warmup: int = 3  # untimed passes first (allocator, cuDNN, thread pools)
    min_repeats: int = 10  # timed passes at least ...
    min_seconds: float = 0.2  # ... and at least this long in all; the median is logged


class Amp(Enum):
    none = "none"  # float32 throughout
    bf16 = "bf16"  # bfloat16 autocast for attacks and evaluation (IG stays float32)


@dataclass
class PerfConfig:
    """How fast, never what: results are the same with any of these (amp aside; see README
    "Performance"). ``perf.amp`` is part of a cell's identity, the rest is not."""

    # Share across the jobs of one process what does not depend on the cell: pruned models,
    # clean predictions, FGSM directions, clean IG maps (robustsweep.tracking.reuse).
    reuse: bool = True
    amp: Amp = Amp.none
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its convolution algorithms once per shape
    # a sweep logs how long its cells will take before it starts (robustsweep.estimate: 1.8-6 s of
    # calibration on the 2-core CPU box)
    estimate: bool = True


@dataclass
class CompressConfig:
    """Settings of the compress step that are not a stage's own group (robustsweep.steps.compress)."""

    # training images whose batch statistics replace every BatchNorm's running statistics after
    # compression and any fine-tune, before quantization (0 = off: the dense model's statistics)
    bn_recalibrate: int = 0


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
    objective: Any = None  # the dense baseline's training objective (conf/objective/)
    prune: Any = field(default_factory=lambda: dict.fromkeys(DEPRECATED_PRUNE_KEYS))
    compress: CompressConfig = field(default_factory=CompressConfig)
    defend: Any = None  # fine-tuning after compression (conf/defend/; none = no fine-tune)
    quantize: Any = None  # post-training quantization after pruning (conf/quantize/; none = float)
    attack: Any = None
    attribution: Any = None
    drift: Any = None  # attribution drift against the dense model (conf/drift/; none = off)
    transfer: Any = None  # the dense model's adversarial examples on the compressed one (conf/transfer/)
    min_norm: Any = None  # per-image minimum-norm search: the security curve (conf/min_norm/)
    certify: Any = None  # certified robust accuracy by bound propagation (conf/certify/)
    tracking: Any = None
    search: Optional[SearchConfig] = None  # noqa: UP045 ; set by search=cliff
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# conf/ folders that are not keys of the config: Hydra's own, and overlays (# @package _global_)
NOT_KEYS = ("hydra", "experiment")
# Config groups the schema above does not name: a conf/ folder added since (a new evaluator or
# compression stage of robustsweep's own) or the group of an installed plug-in
# (robustsweep.core.plugins). Each is a key that is None -- off, and not part of a cell's identity --
# until ``+group=option`` chooses an option; listing it in conf/config.yaml's defaults is optional.
OPTIONAL_GROUPS = tuple(g for g in dict.fromkeys(
    [*sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in NOT_KEYS), *plugins.groups()])
    if g.isidentifier() and g not in {f.name for f in fields(Config)})


def _with_groups(base: type, groups: tuple[str, ...]) -> type:
    """``base`` plus an ``Any = None`` key per group. Same name and module as ``base``, so a pickled
    config (a worker process's job) finds it."""
    if not groups:
        return base
    cls = make_dataclass(base.__name__, [(g, Any, field(default=None)) for g in groups], bases=(base,))
    cls.__module__, cls.__qualname__, cls.__doc__ = base.__module__, base.__qualname__, base.__doc__
    return cls


Config = _with_groups(Config, OPTIONAL_GROUPS)

LAUNCH_ENV = "ROBUSTSWEEP_LAUNCH_ID"


def launch_id() -> str:
    """``${launch_id:}`` in Hydra's run and sweep folders: the launching process's pid and 4 random hex
    digits. Folders named to the second alone collided when two commands started in the same second
    (two sweeps then staged their jobs' files in one folder). Chosen once per launch and kept in the
    environment, so every job of a sweep, in this process or a worker process it starts (joblib,
    submitit), names the same folder; the CLI's ``main()`` forgets an inherited one, so each command
    gets its own."""
    if not os.environ.get(LAUNCH_ENV):
        os.environ[LAUNCH_ENV] = f"{os.getpid()}-{secrets.token_hex(2)}"
    return os.environ[LAUNCH_ENV]


def register_configs() -> None:
    """Register the schema and the ``launch_id`` resolver (idempotent; Hydra's ConfigStore replaces
    same-named nodes)."""
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("launch_id"):
        OmegaConf.register_new_resolver("launch_id", launch_id, use_cache=True)


register_configs()
