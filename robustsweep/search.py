"""The robustness cliff: its definition, a bisection sampler for Optuna, the study storage, the figure.

Definitions (``search.*`` keys, documented in the README):

* The *reference* is the dense model: the same data/model/attack/epsilon at ``search.param`` =
  ``search.reference`` (sparsity 0). It is trial 0 of every study and is computed once.
* A trial at sparsity ``s`` is **safe** when both *constraints* are <= 0 (Optuna's convention for
  feasible)::

      criterion=asr:        c1 = asr(s) - asr(0) - delta                 (ASR may rise by delta)
      criterion=robust_acc: c1 = robust_acc(0) - robust_acc(s) - delta   (may fall by delta)
      always:               c2 = clean_acc(0) - clean_acc(s) - delta_acc (clean may fall by delta_acc)

  An ASR that cannot be measured (no correctly classified image: NaN) counts as unsafe, and so
  does a collapsed model (metric ``collapsed`` = 1: near-chance accuracy or most classes never
  predicted), whose small ASR would otherwise read as "robust".
* The **cliff** is the boundary between safe and unsafe sparsities, reported as the bracket
  ``[cliff_low, cliff_high]``: the largest sparsity judged safe and the smallest judged unsafe,
  ``cliff_width = cliff_high - cliff_low`` and ``best_safe_sparsity = cliff_low``. "Judged" uses
  a monotone (isotonic, pool-adjacent-violators) fit of the margin ``max(c1, c2)`` over all trials,
  which is exactly the raw safe/unsafe label whenever the labels are already monotone in
  sparsity; where they are not (measurement noise near the cliff), neighbouring trials are
  averaged instead of letting one noisy point decide. Safe points above ``cliff_high`` are
  counted in ``n_nonmonotone``.

Everything here is plain Python + Optuna (no Hydra, no MLflow), so the unit tests drive it with
synthetic objectives; ``hydra_plugins/robustsweep_optuna`` wires it to Hydra jobs and MLflow
(and imports this module only when a search starts).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers._base import _process_constraints_after_trial
from optuna.trial import FrozenTrial, TrialState

from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import is_masked, redact_url, with_db_driver
from robustsweep.core.schema import Criterion as _CriterionName
from robustsweep.core.schema import Sampler as _SamplerName

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CRITERIA = tuple(c.value for c in _CriterionName)  # the schema's enums: one list of names
SAMPLERS = tuple(c.value for c in _SamplerName)
CONSTRAINTS_ATTR = "constraints"  # user attr holding [c1, c2] of a trial
UNIDENTIFIABLE_TAG = "cliff_unidentifiable"  # study attr and parent-run tag: why no cliff can be found
ROLE_ATTR = "robustsweep.role"  # "reference" for trial 0
INTERRUPTED_ATTR = "robustsweep.interrupted"
SPEC_ATTR = "robustsweep.spec"  # study user attr: what the study optimises (checked on resume)
UNMEASURABLE = 1.0  # constraint value for a NaN metric (e.g. ASR of a model correct on nothing)
COLLAPSED_METRIC = "collapsed"  # 1.0 for a degenerate model (robustsweep.steps.evaluate.robust)
# Metrics are fractions of image counts: 1.00 - 0.95 - 0.05 is 4e-17 in floating point, not 0. A
# margin this close to zero is on the limit, and the limit is allowed ("falls by at most delta").
BOUNDARY_TOL = 1e-9


# ------------------------------------------------------------------------------- criterion
@dataclass(frozen=True)
class Criterion:
    """When is a sparsity safe, relative to the dense reference."""

    metric: str = "asr"  # asr | robust_acc
    delta: float = 0.10  # allowed rise of ASR (or fall of robust accuracy), fraction 0..1
    delta_acc: float = 0.05  # allowed fall of clean accuracy, fraction 0..1

    def __post_init__(self) -> None:
        if self.metric not in CRITERIA:
            raise ConfigError(f"search.criterion={self.metric!r} is not valid; allowed: "
                              f"{', '.join(CRITERIA)} (or null for a plain optimisation)")
        for key, v in (("search.delta", self.delta), ("search.delta_acc", self.delta_acc)):
            if not (isinstance(v, int | float) and 0 <= v <= 1):
                raise ConfigError(f"{key}={v!r} is not valid; allowed: a number in [0, 1]")

    def constraints(self, metrics: dict[str, float], ref: dict[str, float]) -> list[float]:
        """[c1, c2]; both <= 0 means safe. NaN (unmeasurable) counts as unsafe.

        When the trial logged its paired differences against the dense model (the ``paired``
        evaluator: same images, 95 % bootstrap interval), a sparsity is unsafe only when the whole
        interval is past the allowance: c1 = (lower end of the ASR rise on the images both models
        classify) - delta, or (lower end of the robust-accuracy fall) - delta; c2 = (lower end of the
        clean-accuracy fall) - delta_acc. Otherwise (metrics without them: synthetic objectives,
        cells logged before the paired evaluator) the point difference of the two levels."""
        m, r = metrics[self.metric], ref[self.metric]
        if self.metric == "asr" and "delta_asr_common_lo" in metrics:
            c1 = metrics["delta_asr_common_lo"] - self.delta
        elif self.metric == "robust_acc" and "delta_robust_acc_hi" in metrics:
            c1 = -metrics["delta_robust_acc_hi"] - self.delta
        else:
            c1 = (m - r - self.delta) if self.metric == "asr" else (r - m - self.delta)
        if "delta_clean_acc_hi" in metrics:
            c2 = -metrics["delta_clean_acc_hi"] - self.delta_acc
        else:
            c2 = ref["clean_acc"] - metrics["clean_acc"] - self.delta_acc
        if metrics.get(COLLAPSED_METRIC):  # a degenerate model's ASR says nothing: never safe
            c1 = max(c1, UNMEASURABLE)
        return [UNMEASURABLE if math.isnan(c) else 0.0 if abs(c) <= BOUNDARY_TOL else float(c)
                for c in (c1, c2)]

    @property
    def metrics(self) -> tuple[str, str]:
        return (self.metric, "clean_acc")

    def unidentifiable(self, ref: dict[str, float]) -> list[str]:
        """Why no sparsity can ever be judged unsafe by a criterion, given the dense reference's
        levels: an ASR of 1.0 cannot rise by delta, a robust accuracy below delta cannot fall by it,
        nor a clean accuracy below delta_acc. [] when both criteria can be met."""
        why = []
        r = ref.get(self.metric, math.nan)
        if self.metric == "asr" and not r <= 1 - self.delta:
            why.append(f"the dense model's ASR is {r:.3f}, above 1 - search.delta = {1 - self.delta:.3f}: "
                       f"ASR cannot rise by {self.delta}, so the ASR criterion can never call a sparsity "
                       f"unsafe")
        if self.metric == "robust_acc" and not r >= self.delta:
            why.append(f"the dense model's robust accuracy is {r:.3f}, below search.delta = {self.delta}: "
                       f"it cannot fall by that much, so the robustness criterion can never call a sparsity "
                       f"unsafe")
        c = ref.get("clean_acc", math.nan)
        if not c >= self.delta_acc:
            why.append(f"the dense model's clean accuracy is {c:.3f}, below search.delta_acc = "
                       f"{self.delta_acc}")
        return why


def is_safe(constraints: Sequence[float]) -> bool:
    return all(c <= 0 for c in constraints)


# --------------------------------------------------------------------------------- bracket
def isotonic(y: Sequence[float], w: Sequence[float] | None = None) -> list[float]:
    """Non-decreasing least-squares fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w or [1.0] * len(y), strict=True):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [b[0] for b in blocks for _ in range(int(b[2]))]


@dataclass(frozen=True)
class Bracket:
    low: float  # largest sparsity judged safe (nan if none)
    high: float  # smallest sparsity judged unsafe (nan if none: the cliff is above the range)
    n_points: int
    n_nonmonotone: int  # raw-safe points above `high` or raw-unsafe below `low`

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_metrics(self, suffix: str = "") -> dict[str, float]:
        return {f"cliff_low{suffix}": self.low, f"cliff_high{suffix}": self.high,
                f"cliff_width{suffix}": self.width, f"best_safe_sparsity{suffix}": self.low,
                f"n_nonmonotone{suffix}": float(self.n_nonmonotone)}


def bracket(points: Iterable[tuple[float, Sequence[float]]]) -> Bracket:
    """Cliff bracket from (sparsity, constraints) pairs; see the module docstring."""
    by_x: dict[float, list[float]] = {}
    for x, cons in points:
        by_x.setdefault(float(x), []).append(max(cons))
    xs = sorted(by_x)
    if not xs:
        return Bracket(math.nan, math.nan, 0, 0)
    margins = [sum(by_x[x]) / len(by_x[x]) for x in xs]
    fit = isotonic(margins, [float(len(by_x[x])) for x in xs])
    safe = [x for x, f in zip(xs, fit, strict=True) if f <= 0]
    unsafe = [x for x, f in zip(xs, fit, strict=True) if f > 0]
    low = max(safe) if safe else math.nan
    high = min(unsafe) if unsafe else math.nan
    odd = sum(1 for x, m in zip(xs, margins, strict=True)
              if (m <= 0 and unsafe and x > high) or (m > 0 and safe and x < low))
    return Bracket(low, high, sum(len(v) for v in by_x.values()), odd)


def trial_points(trials: Iterable[FrozenTrial], param: str) -> list[tuple[float, list[float]]]:
    """(param value, constraints) of the COMPLETE trials that have both."""
    return [(t.params[param], t.user_attrs[CONSTRAINTS_ATTR]) for t in trials
            if t.state == TrialState.COMPLETE and param in t.params
            and CONSTRAINTS_ATTR in t.user_attrs]


def group_key(params: dict[str, Any], param: str) -> str:
    """Trials that differ only in ``param`` share a cliff: ``prune=global_l1 prune.finetune_epochs=1``."""
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != param)


def brackets_by_group(trials: Iterable[FrozenTrial], param: str) -> dict[str, Bracket]:
    """One bracket per combination of the other searched parameters ("" if there are none).

    The reference trial (dense) is safe for every group, so it joins each of them.
    """
    done = [t for t in trials if t.state == TrialState.COMPLETE and CONSTRAINTS_ATTR in t.user_attrs]
    ref = [t for t in done if t.user_attrs.get(ROLE_ATTR) == "reference"]
    groups: dict[str, list[FrozenTrial]] = {}
    for t in done:
        if t.user_attrs.get(ROLE_ATTR) != "reference":
            groups.setdefault(group_key(t.params, param), []).append(t)
    if not groups:
        groups[group_key(ref[0].params, param) if ref else ""] = []
    return {g: bracket(trial_points([*ref, *ts], param)) for g, ts in sorted(groups.items())}


@dataclass(frozen=True)
class Outcomes:
    """One trial's per-image results (its ``outcomes.csv``): which evaluation images the model
    classifies correctly, and which of those the attack leaves correct."""

    x: float  # the searched parameter's value
    clean_ok: Any  # bool array (n_images,)
    adv_ok: Any  # bool array (n_images,): correct under attack (False where clean is wrong)
    collapsed: bool = False


def _cell_metrics(o: Outcomes, idx: Any) -> dict[str, float]:
    c, a = o.clean_ok[idx], o.adv_ok[idx]
    n_c = int(c.sum())
    return {"clean_acc": float(c.mean()), "robust_acc": float((c & a).mean()),
            "asr": float((c & ~a).sum()) / n_c if n_c else math.nan, COLLAPSED_METRIC: float(o.collapsed)}


def bootstrap_bracket(ref: Outcomes, trials: Sequence[Outcomes], crit: Criterion, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """95 % percentile intervals over images for the bracket's ends.

    Every trial was evaluated on the same images, so each resample draws one set of image indices
    (with replacement) and recomputes every trial's metrics, the reference's included, and the
    bracket from them: a paired bootstrap. Returns ``cliff_low_ci_lo/hi`` and ``cliff_high_ci_lo/hi``
    (NaN-free percentiles over the resamples where that end exists) and ``cliff_boot_n``.
    """
    import numpy as np

    n = len(ref.clean_ok)
    if any(len(t.clean_ok) != n for t in trials):
        raise ValueError("bootstrap_bracket: every trial must be evaluated on the same images")
    rng = np.random.default_rng(seed)
    lows, highs = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r = _cell_metrics(ref, idx)
        pts = [(ref.x, crit.constraints(r, r))]
        pts += [(t.x, crit.constraints(_cell_metrics(t, idx), r)) for t in trials]
        b = bracket(pts)
        lows.append(b.low)
        highs.append(b.high)
    out: dict[str, float] = {"cliff_boot_n": float(n_boot)}
    for name, vals in (("cliff_low", lows), ("cliff_high", highs)):
        v = np.array([x for x in vals if not math.isnan(x)])
        lo, hi = (np.percentile(v, [2.5, 97.5]) if len(v) else (math.nan, math.nan))
        out[f"{name}_ci_lo"], out[f"{name}_ci_hi"] = float(lo), float(hi)
    return out


# ------------------------------------------------------------------------- bisection sampler
class BisectionSampler(optuna.samplers.BaseSampler):
    """Bisection for the 1-D monotone case: the largest safe value of one float parameter.

    Each new trial probes the midpoint of the current bracket (see ``bracket``): first the two
    range ends, then halves, so a cliff in [0, 0.99] is located to width 0.01 in
    2 + ceil(log2(0.99 / 0.01)) = 9 trials where a grid needs 100. Trials running in parallel
    split the bracket further (midpoint of the largest gap between known and pending points), and
    a value whose trial failed is not probed again. Parameters other than ``param`` are sampled
    by ``RandomSampler``. Safety comes from ``constraints_func`` exactly as for Optuna's TPE/GP
    samplers (feasible when every value <= 0); the objective value itself is not used.
    """

    def __init__(self, param: str, constraints_func: Callable[[FrozenTrial], Sequence[float]],
                 tol: float = 0.01, seed: int | None = None) -> None:
        self.param = param
        self.tol = tol
        self._constraints_func = constraints_func
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name != self.param:
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        d = param_distribution
        if not isinstance(d, FloatDistribution) or d.log:
            raise ConfigError(f"search.sampler=bisection needs {param_name} as interval(a, b) "
                              f"(a linear float range); got {d}")
        x = self.next_value(study.get_trials(deepcopy=False), d.low, d.high, exclude=trial.number)
        if d.step:
            x = d.low + round((x - d.low) / d.step) * d.step
        return min(max(round(x, 6), d.low), d.high)  # 1e-6: far below any meaningful sparsity step

    def next_value(self, trials: Sequence[FrozenTrial], low: float, high: float,
                   exclude: int = -1) -> float:
        """Where to probe next, given the trials so far (a pure function of them)."""
        pts = [(t.params[self.param], list(self._constraints_func(t))) for t in trials
               if t.state == TrialState.COMPLETE and self.param in t.params]
        pending = [t.params[self.param] for t in trials
                   if t.number != exclude and self.param in t.params and (
                       t.state == TrialState.RUNNING
                       or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR)))]
        seen = {x for x, _ in pts} | set(pending)
        # The range ends first: a safe low end anchors the bracket; an unsafe high end proves
        # that there is a cliff inside the range.
        for end in (low, high):
            if end not in seen:
                return end
        b = bracket(pts)
        lo = b.low if not math.isnan(b.low) else low
        hi = b.high if not math.isnan(b.high) else high
        if hi <= lo:  # the cliff is outside the range: nothing left to split
            return hi
        cuts = sorted({lo, hi, *(p for p in pending if lo < p < hi)})
        gap, a = max((b2 - a2, a2) for a2, b2 in itertools.pairwise(cuts))
        return a + gap / 2

    def converged(self, trials: Sequence[FrozenTrial], low: float, high: float) -> bool:
        """Bracket no wider than ``tol``, or no cliff in the range (high end safe / low end unsafe)."""
        b = bracket(trial_points(trials, self.param))
        if not math.isnan(b.low) and b.low >= high:
            return True
        if not math.isnan(b.high) and b.high <= low:
            return True
        return not math.isnan(b.width) and b.width <= self.tol + 1e-12

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        # Older Optuna: store the constraints where its own tools (best_trial, the dashboard) look.
        if state == TrialState.COMPLETE and not NATIVE_CONSTRAINTS:
            _process_constraints_after_trial(self._constraints_func, study, trial, state)


# Optuna >= 5 takes constraints per trial (Trial.set_constraint) and deprecates constraints_func.
NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def record_constraints(trial: optuna.trial.Trial, constraints: Sequence[float], crit: Criterion) -> None:
    """Attach a trial's safety margins where every sampler (and optuna-dashboard) reads them."""
    trial.set_user_attr(CONSTRAINTS_ATTR, list(constraints))
    if NATIVE_CONSTRAINTS:
        for name, value in zip((crit.metric, "clean_acc"), constraints, strict=True):
            trial.set_constraint(name, value)


def constraints_from_attrs(trial: FrozenTrial) -> list[float]:
    """The ``constraints_func`` the sweeper gives every sampler: constraints stored as a user attr."""
    return list(trial.user_attrs.get(CONSTRAINTS_ATTR, [UNMEASURABLE]))


def build_sampler(name: str, param: str | None, *, constrained: bool, tol: float,
                  seed: int) -> optuna.samplers.BaseSampler:
    """``bisection`` | ``tpe`` | ``gp`` | ``random``; the safety criterion is the constraint."""
    # Older Optuna: the samplers read the margins through constraints_func instead.
    cf = constraints_from_attrs if constrained and not NATIVE_CONSTRAINTS else None
    if name == "bisection":
        if not constrained or param is None:
            raise ConfigError("search.sampler=bisection needs search.criterion (asr or robust_acc) "
                              "and search.param: it bisects safe/unsafe")
        return BisectionSampler(param, constraints_from_attrs, tol=tol, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=cf, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=cf, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"search.sampler={name!r} is not valid; allowed: {', '.join(SAMPLERS)}")


# --------------------------------------------------------------------------------- storage
def open_storage(url: str | None, default: Path, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> optuna.storages.BaseStorage:
    """``None`` -> a JournalStorage file at ``default`` (safe with several worker processes);
    ``sqlite:///...``, ``postgresql://...``, ``mysql://...`` -> RDBStorage, with Optuna's heartbeat
    when ``heartbeat_interval`` is given (stale trials: ``fail_stale``); any other string is a
    journal file path (``journal:`` prefix optional). A bare ``postgresql://`` gets the installed
    driver (``with_db_driver``). Raises ConfigError naming ``search.storage``."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url and is_masked(url):  # copied from `server env` without --show-secrets: say so, not "wrong password"
        raise ConfigError(f"search.storage={redact_url(url)!r}: its password is masked (***); allowed: the "
                          f"real URL, e.g. exported by eval \"$(python -m robustsweep.tracking.server env "
                          f"--show-secrets)\"")
    try:
        if url and "://" in url and not url.startswith("journal:"):
            return optuna.storages.RDBStorage(with_db_driver(url), engine_kwargs={"pool_pre_ping": True},
                                              heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        path = Path(url.removeprefix("journal:")) if url else default
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:  # bad URL, missing driver, unreachable server, unwritable path
        shown = redact_url(url) if url else url
        why = redact_url(str(e))  # the driver's message may quote the URL
        raise ConfigError(  # from None: a chained traceback would print the URL unredacted
            f"search.storage={shown!r} cannot be opened ({type(e).__name__}: {why}); allowed: null (= "
            f"journal file {default}), a journal file path, or an RDB URL such as "
            f"sqlite:///outputs/optuna.db or postgresql://user:pw@host/db") from None


def check_spec(study: optuna.Study, spec: dict[str, Any]) -> None:
    """Store ``spec`` on a new study; refuse to continue a study that optimises something else."""
    old = study.user_attrs.get(SPEC_ATTR)
    if old is None:
        study.set_user_attr(SPEC_ATTR, json.loads(json.dumps(spec)))
        return
    spec = json.loads(json.dumps(spec))  # same normalisation as stored (tuples -> lists)
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if diff:
        raise ConfigError(
            f"study {study.study_name!r} exists with a different objective: "
            + "; ".join(f"{k}: stored {old.get(k)!r}, now {spec.get(k)!r}" for k in diff)
            + ". Allowed: the same settings, or a new search.study_name=<name>")


def _fail_interrupted(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Mark a trial interrupted, then FAIL it (a finished trial's attributes cannot change, so the mark
    comes first); True when this call failed it."""
    storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
    return storage.set_trial_state_values(trial_id, TrialState.FAIL)


def fail_stale(study: optuna.Study) -> int:
    """Fail the trials whose launcher is gone, marked interrupted (not a failure of their cell: they do
    not count against max_failure_rate and their value may be probed again); return how many. With a
    heartbeat (RDB storage) only trials whose last beat is older than the grace period: a second
    launcher on the same study keeps its running trials. Without one (journal file), every RUNNING
    trial: one launcher per study."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return fail_interrupted_trials(study)
    failed = []
    # What optuna.storages.fail_stale_trials does, plus the mark, which must precede FAIL (a finished
    # trial's attributes cannot change). Another launcher may fail the same trial first: skip it.
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        with contextlib.suppress(UpdateFinishedTrialError):
            if _fail_interrupted(storage, trial_id):
                failed.append(storage.get_trial_number_from_id(trial_id))
    if failed:
        log.warning("study %s: %d trial(s) without a heartbeat for the grace period (their launcher is gone) "
                    "marked FAILED: %s", study.study_name, len(failed), sorted(failed))
    return len(failed)


def mark_interrupted(study: optuna.Study, trials: Sequence[optuna.trial.Trial]) -> None:
    """This launcher's own trials, stopped by an interrupt: FAILED and marked interrupted (skipped when
    another launcher already finished them)."""
    from optuna.exceptions import UpdateFinishedTrialError

    for t in trials:
        with contextlib.suppress(UpdateFinishedTrialError):
            _fail_interrupted(study._storage, t._trial_id)


@contextlib.contextmanager
def heartbeats(study: optuna.Study, trials: Sequence[optuna.trial.Trial]) -> Iterator[None]:
    """While the trials run (in launcher jobs, perhaps other processes), this process records their
    heartbeat every ``heartbeat_interval`` seconds: proof for other launchers that they are alive."""
    import threading

    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage) or not trials:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for t in trials:
                with contextlib.suppress(Exception):  # a beat lost to a transient error is not fatal
                    storage.record_heartbeat(t._trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)  # a beat stuck on the database must not hang the sweep


def fail_interrupted_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING (or WAITING with params) by a killed process FAILED; return how many."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _fail_interrupted(study._storage, t._trial_id)
        n += 1
    if n:
        log.warning("study %s: marked %d trial(s) left RUNNING by an interrupted process FAILED",
                    study.study_name, n)
    return n


# ---------------------------------------------------------------------------------- figure
def plot_cliff(trials: Sequence[FrozenTrial], param: str, crit: Criterion,
               ref: dict[str, float]) -> Figure:
    """Criterion metric and clean accuracy vs ``param`` for every trial, thresholds, brackets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.state == TrialState.COMPLETE and CONSTRAINTS_ATTR in t.user_attrs]
    brackets = brackets_by_group(done, param)
    colours = dict(zip(brackets, plt.get_cmap("tab10").colors, strict=False))
    finite = [b for b in brackets.values() if not (math.isnan(b.low) or math.isnan(b.high))]
    multi = len(brackets) > 1
    # Bottom row: one group -> a zoom on its bracket, where bisection's last trials crowd together;
    # several groups (e.g. pruning methods) -> their brackets side by side, the answer to "which
    # one reaches the highest safe sparsity".
    zoom = (min(b.low for b in finite) - 0.05, max(b.high for b in finite) + 0.05) if finite else None
    fig = plt.figure(figsize=(12, 8.4 if (zoom or multi) else 4.6))
    gs = fig.add_gridspec(2 if (zoom or multi) else 1, 2,
                          height_ratios=[3, max(1.2, 0.45 * len(brackets))] if multi else None)
    top = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
    rows: list[tuple[list[Any], tuple[float, float] | None]] = [(top, None)]
    if zoom and not multi:
        rows.append(([fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])], zoom))
    metric_names = {"asr": "attack success rate", "robust_acc": "robust accuracy",
                    "clean_acc": "clean accuracy"}
    thresholds = {crit.metric: ref[crit.metric] + (crit.delta if crit.metric == "asr" else -crit.delta),
                  "clean_acc": ref["clean_acc"] - crit.delta_acc}
    for row, (axes, window) in enumerate(rows):
        for ax, metric in zip(axes, crit.metrics, strict=True):
            shown: list[float] = []
            for g, b in brackets.items():
                c = colours[g]
                if not multi and not (math.isnan(b.low) or math.isnan(b.high)):
                    ax.axvspan(b.low, b.high, color=c, alpha=0.25, lw=0)
                pts = [t for t in done if t.user_attrs.get(ROLE_ATTR) != "reference"
                       and group_key(t.params, param) == g]
                pts.sort(key=lambda t: t.params[param])
                xs = [t.params[param] for t in pts]
                ys = [t.user_attrs.get(metric, math.nan) for t in pts]
                shown += [y for x, y in zip(xs, ys, strict=True)
                          if window is None or window[0] <= x <= window[1]]
                ax.plot(xs, ys, "-", color=c, alpha=0.35, lw=1)
                safe = [is_safe(t.user_attrs[CONSTRAINTS_ATTR]) for t in pts]
                lab = metric == crit.metric and row == 0
                ax.scatter([x for x, s in zip(xs, safe, strict=True) if s],
                           [y for y, s in zip(ys, safe, strict=True) if s], color=c, s=28, zorder=3,
                           label=(g if multi else "safe") if lab else None)
                ax.scatter([x for x, s in zip(xs, safe, strict=True) if not s],
                           [y for y, s in zip(ys, safe, strict=True) if not s], color=c, marker="x",
                           s=34, zorder=3, label="unsafe" if lab and not multi else None)
                for t, x, y in zip(pts, xs, ys, strict=True):
                    if window is None or window[0] <= x <= window[1]:
                        ax.annotate(str(t.number), (x, y), textcoords="offset points", xytext=(3, 4),
                                    fontsize=6, color="0.35")
            ax.scatter([ref.get(param, 0.0)], [ref[metric]], marker="*", s=140, color="black", zorder=4,
                       label="dense reference" if metric == crit.metric and row == 0 else None)
            ax.axhline(thresholds[metric], color="crimson", ls="--", lw=1,
                       label=f"safe limit ({'+' if metric == 'asr' else '-'}"
                             f"{crit.delta if metric == crit.metric else crit.delta_acc:g})")
            ax.set_ylabel(metric_names[metric])
            ax.grid(alpha=0.3)
            if window is None:
                ax.set_ylim(-0.02, 1.02)
                ax.set_xlabel(f"{param} (fraction of weights zeroed)"
                              + ("; o safe, x unsafe" if multi else ""))
            else:
                ax.set_xlim(*window)
                ys_ = [y for y in [*shown, thresholds[metric]] if not math.isnan(y)]
                ax.set_ylim(min(ys_) - 0.03, max(ys_) + 0.03)
                ax.set_xlabel(f"{param}, zoomed on the bracket")
    top[0].legend(fontsize=7, loc="best")
    top[1].legend(handles=top[1].get_lines()[-1:], fontsize=7, loc="lower left")
    if multi:
        ax = fig.add_subplot(gs[1, :])
        names = list(brackets)
        for i, g in enumerate(names):
            b = brackets[g]
            hi = b.high if not math.isnan(b.high) else 1.0
            lo = b.low if not math.isnan(b.low) else 0.0
            ax.barh(i, hi - lo, left=lo, color=colours[g], alpha=0.6, height=0.6)
            ax.text(hi + 0.01, i, f"safe up to {b.low:.3f}, unsafe from {b.high:.3f}", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(0, 1.25)
        ax.set_xlabel(f"cliff bracket in {param} (bar = [largest safe, smallest unsafe])")
        ax.grid(alpha=0.3, axis="x")
        best = max(brackets, key=lambda g: -1.0 if math.isnan(brackets[g].low) else brackets[g].low)
        title = f"highest safe {param}: {brackets[best].low:.4f} with {best}"
    else:
        title = "; ".join(f"{g or param}: cliff in [{b.low:.4f}, {b.high:.4f}]" for g, b in brackets.items())
    fig.suptitle(f"robustness cliff ({crit.metric} +{crit.delta:g}, clean -{crit.delta_acc:g} vs the "
                 f"dense reference)\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


def trials_table(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """One row per trial (all states), for trials.csv."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name,
                               "role": t.user_attrs.get(ROLE_ATTR, "trial")}
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row.update({k: v for k, v in t.user_attrs.items()
                    if k not in (CONSTRAINTS_ATTR, ROLE_ATTR) and not isinstance(v, dict | list)})
        cons = t.user_attrs.get(CONSTRAINTS_ATTR)
        if cons is not None:
            row.update({"c_metric": cons[0], "c_clean": cons[1], "safe": is_safe(cons)})
        rows.append(row)
    return rows
