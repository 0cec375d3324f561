"""The evaluate seam: a list of evaluators run on each compressed model.

An evaluator is one module in this package that calls ``register_evaluator(Evaluator(...))``. It
declares the config group that configures it (with a ``none`` option, so that a user adds or
sweeps it from the command line), the metric names it returns, the ``suspect`` reasons it can
raise (with the words a reviewer reads), and which other evaluators' results it reads. Tracking,
the sweep summary, cells.csv and the Optuna sweeper's objective check read these declarations:
no metric list is written twice. Modules here import their heavy libraries (captum, matplotlib)
inside functions, so discovering the evaluators costs nothing a job does not use.

Each evaluator seeds its own randomness (``torch.manual_seed(cfg.seed)`` before an attack or a
noisy attribution), so adding or removing one never changes another's numbers.

Adding one: a file here with a function ``run(ctx) -> Outcome`` and its registration, and a
config group ``conf/<group>/{none,<yours>}.yaml`` listed in ``conf/config.yaml``'s defaults. From
another package: the same file and one YAML, ``conf/<group>/<yours>.yaml``, declared by an entry
point (robustsweep.core.plugins); its group is off until ``+<group>=<yours>`` chooses it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig
from torch import nn

from robustsweep.core import plugins
from robustsweep.core.cost import Work
from robustsweep.core.errors import ConfigError
from robustsweep.core.registry import is_off
from robustsweep.core.schema import OPTIONAL_GROUPS


class Memo(Protocol):
    """What the jobs of one process share (robustsweep.tracking.reuse implements it): values
    keyed by the cell's model and evaluation images plus ``key``."""

    def get(self, cache: str, *key: Any) -> Any: ...

    def put(self, cache: str, value: Any, *key: Any) -> None: ...


class NoMemo:
    """A memo that remembers nothing (``perf.reuse=false``, tests)."""

    def get(self, cache: str, *key: Any) -> Any:
        return None

    def put(self, cache: str, value: Any, *key: Any) -> None:
        return None


def _no_dense() -> nn.Module:
    raise RuntimeError("this evaluation context has no dense baseline (EvalContext.dense)")


@dataclass
class EvalContext:
    """What an evaluator gets: the compressed model and everything needed to evaluate it."""

    cfg: DictConfig
    model: nn.Module  # eval mode; must leave it bit-identical (the pipeline checks the hash)
    fast: nn.Module  # the same model under perf.amp (bf16 autocast) for attacks, else itself
    model_hash: str
    ds: Any  # robustsweep.steps.data.Dataset
    eps: float
    stage: Path  # files written here are logged as the run's artifacts
    title: str  # "model method sparsity | attack eps" for figure titles
    memo: Memo = field(default_factory=NoMemo)
    results: dict[str, Any] = field(default_factory=dict)  # evaluator name -> Outcome.shared
    # The dense baseline the model was compressed from, loaded on demand (from the baseline cache).
    dense: Callable[[], nn.Module] = _no_dense
    dense_memo: Memo = field(default_factory=NoMemo)  # the memo for what is computed from it
    dense_hash: str = ""  # SHA-256 of the dense baseline's state_dict (== model_hash: uncompressed)

    def __post_init__(self) -> None:
        # ``fast`` may wrap ``model`` (perf.amp=bf16: a new ``Autocast``, in train mode as every new
        # module). Whatever reads the wrapper's flag and "restores" it afterwards then puts the
        # model in train mode mid-evaluation: torchattacks calls model.train() on a model it found
        # training (an attack by ``_target_`` in the sanity probe; the next forward then moved the
        # BatchNorm statistics), ``frozen`` gives every submodule the root's flag (issue 32). The
        # wrapper's own modules take the model's mode; the model's modules are left as they are.
        inner = {id(m) for m in self.model.modules()}
        for m in self.fast.modules():
            if id(m) not in inner:
                m.training = self.model.training


@dataclass(frozen=True)
class CellShape:
    """What an evaluator's work declaration knows of a cell before anything runs
    (robustsweep.estimate): identities that are equal for cells that share the thing."""

    n_eval: int  # evaluation images
    model: str  # the compressed model (equal for cells that differ only in attack or eps)
    dense: str  # the dense baseline it is compressed from
    attack: str  # the attack and its eps
    attack_work: Work | None  # the attack's declared work per attacked image (None: not declared)


# An evaluator's work in one cell: (share key, work) pairs; a pair whose key is not None is done
# once per process for every cell with that key (a memo, a cache), the others in every cell.
WorkItems = list[tuple[tuple[Any, ...] | None, Work]]


@dataclass
class Outcome:
    metrics: dict[str, float]
    reasons: set[str] = field(default_factory=set)  # suspect reasons raised
    shared: Any = None  # what later evaluators that `read` this one get in ctx.results


@dataclass(frozen=True)
class Evaluator:
    name: str
    group: str  # the config node that configures it
    run: Callable[[EvalContext], Outcome]
    metrics: tuple[str, ...]  # every metric name it may return
    # Families of metrics named at run time (``broken_by_<attack>``): a prefix each. Logged, but
    # not cells.csv columns or objectives.
    metric_prefixes: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)  # suspect reason -> what it means
    reads: tuple[str, ...] = ()  # evaluators whose Outcome.shared it reads (they run first)
    # a condition beyond its group being on (robustsweep.core.registry.is_off), e.g. "the attack is on"
    enabled: Callable[[DictConfig], bool] = lambda cfg: True
    # whether its group's "off" turns it off: not for the clean/robust accuracy (attack=none still
    # measures the clean accuracy) and the paired comparison, which the attack group configures
    optional: bool = True
    check: Callable[[DictConfig], None] | None = None  # its own key checks (validate asks)
    # The positions in the evaluation subset whose adversarial examples it will ask the robust
    # evaluator for (``Robust.adversarial``): kept from the evaluation itself, not attacked again.
    adversarial_of: Callable[[EvalContext], Any] | None = None
    # What it costs (robustsweep.core.cost), for the estimate a sweep logs before it runs; None: not
    # declared (the estimate says so). May return None when it cannot say (an undeclared attack).
    work: Callable[[DictConfig, CellShape], WorkItems | None] | None = None

    def on(self, cfg: DictConfig) -> bool:
        """Whether it runs in this cell: its group not off (robustsweep.core.registry.is_off: ``none``,
        or a plug-in's group not chosen) and ``enabled``."""
        return (not self.optional or not is_off(cfg.get(self.group))) and self.enabled(cfg)


EVALUATORS: dict[str, Evaluator] = {}
_discovered = False


def register_evaluator(ev: Evaluator) -> Evaluator:
    EVALUATORS[ev.name] = ev
    return ev


def evaluators() -> list[Evaluator]:
    """Every evaluator, each after the ones it reads (discovered once: every module here)."""
    global _discovered
    if not _discovered:
        for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            importlib.import_module(f"{__name__}.{m.name}")
        _discovered = True
    plugins.load()  # other packages' evaluators (a no-op once loaded; raises again if one failed)
    order: list[Evaluator] = []

    def visit(ev: Evaluator, path: tuple[str, ...]) -> None:
        if ev in order:
            return
        if ev.name in path:
            raise RuntimeError(f"evaluators read each other in a cycle: {' -> '.join((*path, ev.name))}")
        for dep in ev.reads:
            visit(EVALUATORS[dep], (*path, ev.name))
        order.append(ev)

    for ev in sorted(EVALUATORS.values(), key=lambda e: e.name):
        visit(ev, ())
    return order


def declared_metrics() -> tuple[str, ...]:
    return tuple(m for ev in evaluators() for m in ev.metrics)


def declared_reasons() -> dict[str, str]:
    return {r: text for ev in evaluators() for r, text in ev.reasons.items()}


def check_config(cfg: DictConfig) -> None:
    """Each evaluator's own key checks; its group must be a config node."""
    for ev in evaluators():
        if cfg.get(ev.group) is None and ev.group in OPTIONAL_GROUPS:
            continue  # an optional group not chosen (+group=option): off
        if not isinstance(cfg.get(ev.group), DictConfig):
            raise ConfigError(f"{ev.group}={cfg.get(ev.group)!r} is not valid; allowed: a config group, "
                              f"pick one with {ev.group}=<option>")
        if ev.check is not None:
            ev.check(cfg)


def run_evaluators(ctx: EvalContext) -> tuple[dict[str, float], set[str]]:
    """Run the enabled evaluators in order; their metrics and suspect reasons together."""
    metrics: dict[str, float] = {}
    reasons: set[str] = set()
    for ev in evaluators():
        if not ev.on(ctx.cfg) or any(dep not in ctx.results for dep in ev.reads):
            continue
        out = ev.run(ctx)
        unknown = {m for m in set(out.metrics) - set(ev.metrics)
                   if not (ev.metric_prefixes and m.startswith(ev.metric_prefixes))}
        if unknown or out.reasons - set(ev.reasons):
            raise RuntimeError(f"evaluator {ev.name} returned undeclared metrics or reasons: "
                               f"{sorted(unknown | (out.reasons - set(ev.reasons)))}")
        ctx.results[ev.name] = out.shared
        metrics.update(out.metrics)
        reasons |= out.reasons
    return metrics, reasons

