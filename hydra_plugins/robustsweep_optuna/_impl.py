"""An Optuna study whose trials are Hydra jobs (the work behind ``optuna_sweeper.OptunaSweeper``).

Order of events in ``sweep()``, so that bad input costs nothing:

1. Read ``search.*`` and the search space; check everything that can be checked without running
   a job (empty/inverted intervals, sampler/space fit, the objective exists, every corner of the
   space composes and passes ``robustsweep.config.validate``).
2. Open the storage (JournalStorage file by default) and create or load the study; refuse a study
   that optimises something else; mark trials left RUNNING by a killed process FAILED.
3. Open (or reopen) the MLflow parent run of the study; jobs become its children.
4. Trial 0 is the dense reference (``search.param = search.reference``), run alone, once per study.
5. Ask a batch of ``n_jobs`` trials, launch them through the configured Hydra launcher, read
   the metrics each job returns, attach the safety constraints, tell Optuna. A failed job is a
   FAILED trial; more than ``max_failure_rate * n_trials`` of them stop the study.
6. After every batch: cliff bracket metrics on the parent; at the end also the figure and a CSV.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Besides the searched parameter, a cliff search may vary only what does not change the dense
# reference: how the model is pruned.
REFERENCE_FREE = re.compile(r"^(prune|prune\..+)$")


class SearchError(CompactHydraException):
    """Printed by Hydra as its message alone; raised before any trial runs (or when a study stops)."""


class OptunaSweeperImpl(Sweeper):
    def __init__(self, params: dict[str, str]) -> None:
        self.params = params
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------------------ entry point
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from robustsweep.config import ConfigError
        from robustsweep.tracking import sweep as sw

        try:
            plan = self._plan(arguments)
            study = self._open_study(plan)
        except ConfigError as e:
            raise SearchError(f"search not started, nothing was run: {e}") from None
        try:
            return self._run(plan, study)
        finally:
            os.environ.pop(sw.PARENT_ENV, None)
            os.environ.pop(sw.STUDY_ENV, None)

    # ------------------------------------------------------------------ 1. checks and plan
    def _plan(self, arguments: list[str]) -> dict[str, Any]:
        from robustsweep.config import ConfigError
        from robustsweep.pipeline import returned_metrics
        from robustsweep.search import Criterion

        assert self.config is not None and self.hydra_context is not None
        s = self.config.get("search")
        if s is None:
            raise ConfigError("hydra/sweeper=robustsweep_optuna reads its settings from the `search` "
                              "node, which is not set; allowed: add search=cliff")
        s = OmegaConf.to_container(s, resolve=True, enum_to_str=True)
        for key, ok, allowed in (
                ("n_trials", isinstance(s["n_trials"], int) and s["n_trials"] >= 1, "an integer >= 1"),
                ("n_jobs", isinstance(s["n_jobs"], int) and s["n_jobs"] >= 1, "an integer >= 1"),
                ("tol", s["tol"] > 0, "a number > 0"),
                ("max_failure_rate", 0 <= s["max_failure_rate"] <= 1, "a number in [0, 1]"),
                ("heartbeat_interval", isinstance(beat := s["heartbeat_interval"], int) and beat >= 1,
                 "an integer >= 1 (seconds)"),
                ("grace_period", isinstance(s["grace_period"], int) and s["grace_period"] > beat,
                 "an integer of seconds > search.heartbeat_interval")):
            if not ok:
                raise ConfigError(f"search.{key}={s[key]!r} is not valid; allowed: {allowed}")
        crit = Criterion(s["criterion"], s["delta"], s["delta_acc"]) if s["criterion"] else None

        fixed, space = self._space(arguments)
        param = s["param"]
        if not space:
            raise ConfigError("nothing to search: no key has a search space; allowed: e.g. "
                              "sparsity=interval(0, 0.99) on the command line or in hydra.sweeper.params")
        if crit is not None:
            if param not in space:
                raise ConfigError(f"search.param={param!r} is not searched (searched: {', '.join(space)}); "
                                  f"allowed: give it a range, e.g. {param}=interval(0, 0.99)")
            others = [k for k in space if k != param and not REFERENCE_FREE.match(k)]
            if others:
                raise ConfigError(
                    f"searching {', '.join(others)} would change the dense reference, which a cliff "
                    f"search computes once; allowed besides {param}: prune, prune.* (run one search "
                    f"per value of {', '.join(others)} instead)")
        if s["sampler"] == "bisection":
            import optuna

            if crit is None:
                raise ConfigError("search.sampler=bisection needs search.criterion (asr or "
                                  "robust_acc); allowed samplers for a plain optimisation: tpe, gp, random")
            if set(space) != {param} or not isinstance(space[param], optuna.distributions.FloatDistribution) \
                    or space[param].log:
                raise ConfigError(
                    f"search.sampler=bisection searches one linear float key, {param}=interval(a, b); "
                    f"searched: {', '.join(f'{k}={_describe(v)}' for k, v in space.items())}. Allowed for "
                    f"several keys: search.sampler=tpe or gp")
        objective = s["objective"]
        if objective not in space and objective not in returned_metrics():
            raise ConfigError(f"search.objective={objective!r} is neither a searched key "
                              f"({', '.join(space)}) nor a metric the job returns; allowed: "
                              f"{', '.join([*space, *returned_metrics()])}")

        jobs = self._corner_jobs(fixed, space, param if crit else None, s["reference"])
        cfgs = self._validate(jobs)
        return {"s": s, "crit": crit, "fixed": fixed, "space": space, "param": param,
                "ref_cfg": cfgs[0]}

    def _space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any]]:
        """Fixed overrides (as typed) and {key: Optuna distribution}; the command line wins over
        hydra.sweeper.params."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        by_key: dict[str, Override] = {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]):
            by_key[o.get_key_element()] = o
        for o in parser.parse_overrides(arguments):
            by_key[o.get_key_element()] = o
        fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
        space = {k: _distribution(o) for k, o in by_key.items() if o.is_sweep_override()}
        return fixed, space

    def _corner_jobs(self, fixed: list[str], space: dict[str, Any], param: str | None,
                     reference: float) -> list[list[str]]:
        """The reference job first, then every range end and every choice (others at their first)."""
        first = {k: _values(d)[0] for k, d in space.items()}
        if param is not None:
            first[param] = reference
        jobs = [_job(fixed, first)]
        for k, d in space.items():
            for v in _values(d):
                jobs.append(_job(fixed, {**first, k: v}))
        return jobs

    def _validate(self, jobs: list[list[str]]) -> list[DictConfig]:
        from robustsweep.config import ConfigError, compose_and_validate

        assert self.hydra_context is not None and self.config is not None
        cfgs: list[DictConfig] = []
        for overrides in jobs:  # one at a time: the first bad job stops it, named in the message
            try:
                got, errors = compose_and_validate(self.hydra_context.config_loader, self.config,
                                                   [overrides])
            except Exception as e:  # Hydra's own compose errors (unknown group option, bad type)
                raise ConfigError(f"job [{' '.join(overrides)}]: {type(e).__name__}: {e}") from None
            if errors:
                raise ConfigError(errors[0])
            cfgs += got
        return cfgs

    # --------------------------------------------------------------------- 2. the study
    def _open_study(self, plan: dict[str, Any]) -> Any:
        import optuna

        from robustsweep.config import ConfigError, resolve_path
        from robustsweep.search import (
            SPEC_ATTR,
            build_sampler,
            check_spec,
            fail_stale,
            open_storage,
            redact_url,
        )
        from robustsweep.tracking.identity import cell_id, lookup_ids

        s, crit, ref_cfg = plan["s"], plan["crit"], plan["ref_cfg"]
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # we log every trial ourselves
        default = resolve_path(ref_cfg.paths.output_dir) / "optuna" / "journal.log"
        storage = open_storage(s["storage"], default, s["heartbeat_interval"], s["grace_period"])
        name = s["study_name"] or _default_study_name(plan)
        sampler = build_sampler(s["sampler"], plan["param"] if crit else None,
                                constrained=crit is not None, tol=s["tol"], seed=s["seed"])
        for attempt in range(4):
            try:
                study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                            direction=s["direction"], load_if_exists=True)
                break
            except Exception as e:
                # Two launchers opening one new study (or database) at once race in Optuna's schema
                # and study creation; the loser finds everything there when it tries again.
                if attempt < 3:
                    time.sleep(0.5 + random.random())
                    storage = open_storage(s["storage"], default, s["heartbeat_interval"], s["grace_period"])
                    continue
                raise ConfigError(f"search.storage={redact_url(str(s['storage']))!r}: cannot create or load "
                                  f"study {name!r} ({type(e).__name__}: {redact_url(str(e))})") from None
        spec = {"objective": s["objective"], "direction": s["direction"], "criterion": s["criterion"],
                "delta": s["delta"] if crit else None, "delta_acc": s["delta_acc"] if crit else None,
                "param": plan["param"] if crit else None, "reference": s["reference"] if crit else None,
                "reference_cell": cell_id(ref_cfg) if crit else None}
        if study.direction.name.lower() != s["direction"]:
            raise ConfigError(f"study {name!r} exists with direction {study.direction.name.lower()}, "
                              f"asked search.direction={s['direction']}; allowed: the same direction or "
                              f"a new search.study_name=<name>")
        stored = study.user_attrs.get(SPEC_ATTR) or {}
        if crit and stored.get("reference_cell") in lookup_ids(ref_cfg):  # stored under an older id scheme
            spec["reference_cell"] = stored["reference_cell"]
        check_spec(study, spec)
        fail_stale(study)
        plan["storage_desc"] = redact_url(s["storage"]) if s["storage"] else f"journal file {default}"
        log.info("study %s (%s, sampler %s): %d trial(s) stored", name, plan["storage_desc"],
                 s["sampler"], len(study.trials))
        return study

    # ---------------------------------------------------------------------- 3-6. trials
    def _run(self, plan: dict[str, Any], study: Any) -> list[Sequence[JobReturn]]:
        from optuna.trial import TrialState

        from robustsweep.core import process
        from robustsweep.core.paths import redact_url
        from robustsweep.search import INTERRUPTED_ATTR, ROLE_ATTR, fail_stale
        from robustsweep.tracking import store as tracking
        from robustsweep.tracking import sweep as sw
        from robustsweep.tracking.cellrun import LAUNCHER_ENV

        assert self.config is not None
        s, crit, param, space = plan["s"], plan["crit"], plan["param"], plan["space"]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # redacted: a password in search.storage or tracking.uri must not land in a file
        (sweep_dir / "multirun.yaml").write_text(redact_url(OmegaConf.to_yaml(self.config)))

        experiment_id = tracking.setup(plan["ref_cfg"])
        client = tracking.Client()
        parent = sw.get_or_create_parent(
            client, experiment_id, sw.sweep_id([study.study_name, plan["storage_desc"]], "optuna"),
            name=f"study {study.study_name}"[:250], role="study",
            tags={"optuna.study_name": study.study_name, "optuna.storage": plan["storage_desc"],
                  "optuna.sampler": s["sampler"], "hydra.sweep.dir": str(sweep_dir.resolve()),
                  "hydra.overrides": redact_url(" ".join(self.config.hydra.overrides.task)),
                  "robustsweep.search": json.dumps({k: v for k, v in s.items() if k != "storage"})})
        os.environ[sw.PARENT_ENV] = parent
        os.environ[sw.STUDY_ENV] = study.study_name
        os.environ[LAUNCHER_ENV] = process.identity()  # worker processes stop when this one is gone
        self.plan, self.study, self.client, self.parent = plan, study, client, parent

        def counted() -> list[Any]:
            return [t for t in study.get_trials(deepcopy=False)
                    if t.state == TrialState.COMPLETE
                    or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR))]

        returns: list[Sequence[JobReturn]] = []
        failures: list[str] = []
        ref = self._reference_metrics()
        if crit is not None and ref is not None:  # a resumed study: say it again
            self._check_identifiable(crit, ref)
        if crit is not None and ref is None and not any(
                t.user_attrs.get(ROLE_ATTR) == "reference" and t.state == TrialState.WAITING
                for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial({param: float(s["reference"])}, user_attrs={ROLE_ATTR: "reference"})
        n_before = len(counted())
        if n_before:
            log.info("continuing study %s: %d finished trial(s) count towards n_trials=%d",
                     study.study_name, n_before, s["n_trials"])
        while len(counted()) < s["n_trials"]:
            if crit is not None and ref is not None and self._converged():
                break
            fail_stale(study)  # another launcher on this study may have died meanwhile
            k = 1 if (crit is not None and ref is None) else min(s["n_jobs"], s["n_trials"] - len(counted()))
            trials = [study.ask(space) for _ in range(k)]
            returns.append(self._launch(trials, failures))
            ref = self._reference_metrics()
            if crit is not None and ref is None:
                self._finish("FAILED")
                raise SearchError(f"the dense reference trial failed, so no trial can be judged: "
                                  f"{failures[-1] if failures else 'see the log'}")
            self._log_bracket()
            n_failed = sum(1 for t in counted() if t.state == TrialState.FAIL)
            if n_failed > s["max_failure_rate"] * s["n_trials"]:
                self._finish("FAILED")
                raise SearchError(
                    f"study {study.study_name} stopped: {n_failed} failed trials > search.max_failure_rate"
                    f"={s['max_failure_rate']} x n_trials={s['n_trials']}:\n  " + "\n  ".join(failures))
        stop_reason = (f"bracket narrower than tol={s['tol']} (or no cliff in the range)"
                       if crit is not None and self._converged() else "n_trials reached")
        log.info("study %s stopped: %s", study.study_name, stop_reason)
        self._finish("FINISHED", stop_reason)
        if failures:
            log.warning("%d trial(s) failed (within search.max_failure_rate):\n  %s",
                        len(failures), "\n  ".join(failures))
        return returns

    def _launch(self, trials: list[Any], failures: list[str]) -> Sequence[JobReturn]:
        from optuna.trial import TrialState

        from robustsweep.config import ConfigError
        from robustsweep.core.device import PARALLEL_ENV, parallel_jobs
        from robustsweep.core.paths import redact_url
        from robustsweep.search import ROLE_ATTR, heartbeats, is_safe, mark_interrupted, record_constraints
        from robustsweep.tracking import sweep as sw

        plan, study = self.plan, self.study
        crit = plan["crit"]
        jobs = [[*_job(plan["fixed"], t.params), f"++hydra.job.env_set.{sw.TRIAL_ENV}={t.number}"]
                for t in trials]
        try:
            self._validate([j[:-1] for j in jobs])
        except ConfigError as e:  # a sampled value the corner checks could not foresee
            # redacted: user attrs are stored in the study (trials.csv, optuna-dashboard), failures logged
            for t in trials:
                t.set_user_attr("error", redact_url(str(e))[:1000])
                study.tell(t, state=TrialState.FAIL)
            failures.append(redact_url(str(e)))
            return []
        # worker processes take their share of the cores (robustsweep.core.device.share_cpu_threads)
        os.environ[PARALLEL_ENV] = str(parallel_jobs(self.config.hydra.launcher, len(jobs)))
        try:
            with heartbeats(study, trials):  # other launchers on this study see them alive
                results = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
        except BaseException:  # Ctrl-C, a lost worker: these trials were interrupted, not failed by
            mark_interrupted(study, trials)  # their cells; a relaunch probes them again at once
            raise
        order = sorted(zip(trials, results, strict=True),
                       key=lambda tr: tr[0].user_attrs.get(ROLE_ATTR) != "reference")
        for t, r in order:
            desc = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in t.params.items())
            metrics = r._return_value if r.status == JobStatus.COMPLETED else None
            if not isinstance(metrics, dict):
                err = r._return_value if r.status == JobStatus.FAILED else "the job returned no metrics"
                kind = f"{type(err).__name__}: " if isinstance(err, BaseException) else ""
                msg = redact_url(f"trial {t.number} [{desc}]: {kind}{err}")  # a driver's error may quote a URL
                failures.append(msg)
                t.set_user_attr("error", msg[:1000])
                study.tell(t, state=TrialState.FAIL)
                log.warning("%s -> FAILED", msg)
                continue
            needed = [plan["s"]["objective"]] if plan["s"]["objective"] not in t.params else []
            needed += list(crit.metrics) if crit else []
            missing = [m for m in needed if m not in metrics]
            if missing:
                study.tell(t, state=TrialState.FAIL)
                self._finish("FAILED")
                raise SearchError(f"the job returned no {', '.join(missing)} (it returned: "
                                  f"{', '.join(sorted(metrics))}); check search.objective/criterion")
            for k in ("asr", "robust_acc", "clean_acc", "n_correct", "n_eval", "sparsity_measured",
                      "n_pred_classes"):
                if k in metrics:
                    t.set_user_attr(k, float(metrics[k]))
            verdict = ""
            if crit is not None:
                if t.user_attrs.get(ROLE_ATTR) == "reference":
                    study.set_user_attr("reference", {k: float(metrics[k]) for k in
                                                      ("asr", "robust_acc", "clean_acc") if k in metrics})
                    self._check_identifiable(crit, study.user_attrs["reference"])
                cons = crit.constraints(metrics, self._wait_for_reference())
                record_constraints(t, cons, crit)
                verdict = (f" -> {'safe' if is_safe(cons) else 'UNSAFE'} ({crit.metric} margin "
                           f"{cons[0]:+.3f}, clean margin {cons[1]:+.3f})")
            value = t.params[plan["s"]["objective"]] if plan["s"]["objective"] in t.params \
                else metrics[plan["s"]["objective"]]
            study.tell(t, float(value))
            log.info("trial %d [%s]: %s%s", t.number, desc,
                     " ".join(f"{k} {metrics[k]:.4f}" for k in ("clean_acc", "asr", "robust_acc")
                              if k in metrics), verdict)
        return results

    # ------------------------------------------------------------------ results and parent
    def _wait_for_reference(self) -> dict[str, float]:
        """The dense reference's metrics; when another launcher on this study is still computing the
        reference trial, wait for it (a line every ~10 s) instead of judging against nothing."""
        from optuna.trial import TrialState

        from robustsweep.search import ROLE_ATTR, fail_stale

        said = time.monotonic()
        while (ref := self.study.user_attrs.get("reference")) is None:
            fail_stale(self.study)  # that launcher may have died meanwhile
            pending = [t for t in self.study.get_trials(deepcopy=False)
                       if t.user_attrs.get(ROLE_ATTR) == "reference"
                       and t.state in (TrialState.RUNNING, TrialState.WAITING)]
            if not pending:
                self._finish("FAILED")
                raise SearchError("the dense reference trial of this study failed in another launcher, so no "
                                  "trial can be judged; relaunch to compute it again")
            if time.monotonic() - said > 10:
                log.info("waiting for the dense reference (trial %d, run by another launcher on this study)",
                         pending[0].number)
                said = time.monotonic()
            time.sleep(2)
        return ref

    def _check_identifiable(self, crit: Any, ref: dict[str, float]) -> None:
        """Warn at once, and tag the study and its parent run, when the dense reference leaves a
        criterion nothing to detect (e.g. AutoAttack at 8/255: dense ASR 1.0)."""
        from robustsweep.search import UNIDENTIFIABLE_TAG

        why = crit.unidentifiable(ref)
        if not why:
            return
        reason = "; ".join(why)
        log.warning("cliff unidentifiable: %s. The search goes on, but its bracket cannot show a robustness "
                    "cliff; the study and its parent run are tagged %s", reason, UNIDENTIFIABLE_TAG)
        self.study.set_user_attr(UNIDENTIFIABLE_TAG, reason)
        self.client.set_tag(self.parent, f"robustsweep.{UNIDENTIFIABLE_TAG}", reason)

    def _reference_metrics(self) -> dict[str, float] | None:
        return self.study.user_attrs.get("reference") if self.plan["crit"] is not None else None

    def _converged(self) -> bool:
        from robustsweep.search import BisectionSampler

        sampler, param = self.study.sampler, self.plan["param"]
        d = self.plan["space"][param]
        if isinstance(sampler, BisectionSampler):
            return sampler.converged(self.study.get_trials(deepcopy=False), d.low, d.high)
        return False

    def _metrics(self) -> dict[str, float]:
        from optuna.trial import TrialState

        from robustsweep.search import brackets_by_group

        trials = self.study.get_trials(deepcopy=False)
        out = {"n_trials": float(len(trials)),
               "n_complete": float(sum(t.state == TrialState.COMPLETE for t in trials)),
               "n_failed": float(sum(t.state == TrialState.FAIL for t in trials))}
        if self.plan["crit"] is None:
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            if done:
                out["best_value"] = self.study.best_value
            return out
        groups = brackets_by_group(trials, self.plan["param"])
        best = max(groups.values(), key=lambda b: -1.0 if math.isnan(b.low) else b.low)
        out.update(best.as_metrics())
        if len(groups) > 1:
            for g, b in groups.items():
                out.update(b.as_metrics("." + re.sub(r"[^\w.\- /]", "_", g)))
        return out

    def _log_bracket(self) -> dict[str, float]:
        import time

        from mlflow.entities import Metric

        m = self._metrics()
        now = int(time.time() * 1000)
        step = int(m["n_trials"])
        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), now, step) for k, v in m.items()])
        if "cliff_low" in m:
            log.info("cliff bracket [%.4f, %.4f] (width %.4f) after %d trial(s)", m["cliff_low"],
                     m["cliff_high"], m["cliff_width"], step)
        return m

    def _bootstrap(self) -> dict[str, float]:
        """95 % intervals over images for the bracket's ends, from the trials' per-image outcomes
        (their ``outcomes.csv``): a bracket finer than the evaluation noise shows as an interval
        wider than it. Only for a search over the one parameter (with other searched parameters,
        each group would need its own); {} when some trial's outcomes are missing."""
        from robustsweep.search import Outcomes, bootstrap_bracket
        from robustsweep.tracking.outcomes import run_outcomes
        from robustsweep.tracking.sweep import finished_children

        plan = self.plan
        param = plan["param"]
        if set(plan["space"]) != {param}:
            log.info("bootstrap of the bracket: skipped (it covers a search over %s alone)", param)
            return {}
        ref_x = float(plan["s"]["reference"])
        ref, trials = None, {}
        children = finished_children(self.client, self.parent)
        if any("delta_clean_acc_lo" in r.data.metrics for r in children):
            # The trials were judged by their paired intervals, which already carry the image-level
            # uncertainty; resampling images under the point rule would bracket a different rule.
            log.info("bootstrap of the bracket: not needed (each trial was judged by the 95 %% interval of its "
                     "paired differences against the dense model)")
            return {}
        for r in children:
            if param not in r.data.params:
                continue
            x = float(r.data.params[param])
            try:
                o = run_outcomes(self.client, r.info.run_id)
            except Exception as e:  # a run logged before outcomes.csv existed
                log.warning("bootstrap of the bracket: skipped (run %s has no outcomes.csv: %s)",
                            r.info.run_id, e)
                return {}
            out = Outcomes(x, o["clean_ok"], o["adv_ok"], bool(r.data.metrics.get("collapsed", 0.0)))
            if x == ref_x:
                ref = out
            else:
                trials.setdefault(x, out)
        if ref is None or not trials:
            log.warning("bootstrap of the bracket: skipped (the reference's or the trials' runs are not "
                        "children of this study's parent run)")
            return {}
        import time

        from mlflow.entities import Metric

        boot = bootstrap_bracket(ref, list(trials.values()), plan["crit"], seed=int(self.config.get("seed", 0)))
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), now, 0) for k, v in boot.items()])
        log.info("cliff bracket, 95 %% bootstrap over %d images: low in [%.4f, %.4f], high in [%.4f, %.4f]",
                 len(ref.clean_ok), boot["cliff_low_ci_lo"], boot["cliff_low_ci_hi"], boot["cliff_high_ci_lo"],
                 boot["cliff_high_ci_hi"])
        return boot

    def _finish(self, status: str, reason: str = "") -> None:
        """Final metrics, figure, trials.csv and cliff.json on the parent; close it."""
        import matplotlib.pyplot as plt

        from robustsweep.search import brackets_by_group, plot_cliff, trials_table

        plan, study = self.plan, self.study
        m = self._log_bracket()
        trials = study.get_trials(deepcopy=False)
        result: dict[str, Any] = {"study_name": study.study_name, "storage": plan["storage_desc"],
                                  "stopped": reason or status, "metrics": m}
        if study.user_attrs.get("cliff_unidentifiable"):
            result["cliff_unidentifiable"] = study.user_attrs["cliff_unidentifiable"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "search"
            out.mkdir()
            rows = trials_table(trials)
            if rows:
                keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
                with open(out / "trials.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=keys)
                    w.writeheader()
                    w.writerows(rows)
            ref = self._reference_metrics()
            if plan["crit"] is not None and ref is not None:
                result["brackets"] = {g or plan["param"]: {"low": b.low, "high": b.high, "width": b.width}
                                      for g, b in brackets_by_group(trials, plan["param"]).items()}
                boot = self._bootstrap()
                if boot:
                    result["bootstrap"] = boot
                fig = plot_cliff(trials, plan["param"], plan["crit"], {**ref, plan["param"]:
                                                                       plan["s"]["reference"]})
                fig.savefig(out / "cliff.png", dpi=120)
                plt.close(fig)
            (out / "cliff.json").write_text(json.dumps(result, indent=2, default=str))
            self.client.log_artifacts(self.parent, str(out), "search")
            sweep_dir = Path(self.config.hydra.sweep.dir)
            for name in ("cliff.json", "cliff.png", "trials.csv"):
                if (out / name).exists():
                    (sweep_dir / name).write_bytes((out / name).read_bytes())
        self.client.set_terminated(self.parent, status)
        log.info("study %s: results on MLflow parent run %s (search/cliff.png) and in %s",
                 study.study_name, self.parent, self.config.hydra.sweep.dir)


# ---------------------------------------------------------------------------------- helpers
def _distribution(o: Override) -> Any:
    """Hydra sweep syntax -> Optuna distribution; empty or inverted ranges are errors."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from robustsweep.config import ConfigError

    key, v = o.get_key_element(), o.value()
    if isinstance(v, IntervalSweep):
        bad_tags = set(v.tags) - {"log"}
        if bad_tags:
            raise ConfigError(f"{key}: unknown tag(s) {sorted(bad_tags)}; allowed: tag(log, interval(a, b))")
        if not v.start < v.end:
            raise ConfigError(f"{key}=interval({v.start:g}, {v.end:g}) is empty or inverted; "
                              f"allowed: interval(a, b) with a < b")
        if "log" in v.tags and v.start <= 0:
            raise ConfigError(f"{key}=tag(log, interval({v.start:g}, {v.end:g})): allowed: a > 0")
        return FloatDistribution(float(v.start), float(v.end), log="log" in v.tags)
    if isinstance(v, RangeSweep):
        values = [x for x in o.sweep_iterator()]
        if not values:
            raise ConfigError(f"{key}=range({v.start:g}, {v.stop:g}, {v.step:g}) is empty; allowed: "
                              f"range(start, stop[, step]) with values between start and stop (stop excluded)")
        if v.shuffle:
            return CategoricalDistribution(values)
        if all(isinstance(x, int) for x in values):
            return IntDistribution(values[0], values[-1], step=int(v.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(v.step))
    if isinstance(v, ChoiceSweep):
        return CategoricalDistribution(list(o.sweep_string_iterator()))
    raise ConfigError(f"{o.input_line}: not a search space; allowed: interval(a, b), range(a, b, step), "
                      f"choice(a, b, ...), a,b,c, tag(log, interval(a, b))")


def _describe(d: Any) -> str:
    """A distribution in the grammar it was written in."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    body = f"range({d.low:g}, {d.high:g}, step {d.step:g})" if d.step else f"interval({d.low:g}, {d.high:g})"
    return f"tag(log, {body})" if d.log else body


def _values(d: Any) -> list[Any]:
    """The values worth validating: range ends, every choice."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high]


def _job(fixed: list[str], params: dict[str, Any]) -> list[str]:
    return [*fixed, *(f"{k}={_fmt(v)}" for k, v in params.items())]


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _default_study_name(plan: dict[str, Any]) -> str:
    """cliff-<model>-<attack>-<8 hex>: the hash covers the fixed overrides (minus search.* and
    hydra.*) and the search space, so the same command continues the same study."""
    keep = sorted(f for f in plan["fixed"]
                  if not f.lstrip("+~").startswith(("search", "hydra.", "tracking.resume")))
    space = sorted(f"{k}={d!r}" for k, d in plan["space"].items())
    h = hashlib.sha256(json.dumps([keep, space, plan["s"]["param"]]).encode()).hexdigest()[:8]
    cfg = plan["ref_cfg"]
    prefix = "cliff" if plan["crit"] is not None else "search"
    return f"{prefix}-{cfg.model.name}-{cfg.attack.name}-{h}"
