"""The cliff search without models: synthetic objectives through Optuna's ask/tell."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from robustsweep.config import ConfigError
from robustsweep.search import (
    INTERRUPTED_ATTR,
    ROLE_ATTR,
    BisectionSampler,
    Criterion,
    bracket,
    brackets_by_group,
    build_sampler,
    check_spec,
    constraints_from_attrs,
    fail_interrupted_trials,
    is_safe,
    isotonic,
    open_storage,
    plot_cliff,
    record_constraints,
    trial_points,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
CLIFF = 0.6137
SPACE = {"sparsity": FloatDistribution(0.0, 0.99)}
REF = {"asr": 0.30, "robust_acc": 0.60, "clean_acc": 0.90}


def step_cliff(s: float) -> dict[str, float]:
    """ASR jumps by 0.35 past the cliff; clean accuracy erodes slowly (never the binding limit)."""
    return {"asr": 0.30 + 0.02 * s + (0.35 if s > CLIFF else 0.0), "clean_acc": 0.90 - 0.01 * s,
            "robust_acc": 0.6}


def ramp_cliff(s: float) -> dict[str, float]:
    """A smooth ASR rise whose expected value crosses asr(0) + 0.10 exactly at the cliff."""
    z = (s - CLIFF) / 0.02 + math.log(1 / 3)  # 0.4 * sigmoid(z) = 0.10 at s = CLIFF
    return {"asr": 0.30 + 0.4 / (1 + math.exp(-z)), "clean_acc": 0.90 - 0.02 * s, "robust_acc": 0.6}


def search(objective: Callable[[float], dict[str, float]], sampler: optuna.samplers.BaseSampler,
           n_trials: int = 10, stop_when_converged: bool = True) -> optuna.Study:
    """What the sweeper does, minus Hydra: reference first, then ask -> metrics -> constraints -> tell."""
    crit = Criterion("asr", 0.10, 0.05)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({"sparsity": 0.0}, user_attrs={ROLE_ATTR: "reference"})
    for _ in range(n_trials):
        t = study.ask(SPACE)
        s = t.params["sparsity"]
        m = REF if s == 0.0 else objective(s)
        record_constraints(t, crit.constraints(m, REF), crit)
        for k, v in m.items():
            t.set_user_attr(k, v)
        study.tell(t, s)
        if stop_when_converged and isinstance(sampler, BisectionSampler) and sampler.converged(
                study.trials, 0.0, 0.99):
            break
    return study


def bisection(seed: int = 0) -> BisectionSampler:
    return BisectionSampler("sparsity", constraints_from_attrs, tol=0.01, seed=seed)


def test_bisection_brackets_a_known_cliff_to_0_01_within_10_trials():
    study = search(step_cliff, bisection())
    b = bracket(trial_points(study.trials, "sparsity"))
    assert len(study.trials) <= 10
    assert b.contains(CLIFF) and b.width <= 0.01, b
    assert b.n_nonmonotone == 0
    # the margins are stored where Optuna's samplers and optuna-dashboard look
    assert all(any(k.startswith("constraints") for k in t.system_attrs) for t in study.trials)


@pytest.mark.parametrize("cliff", [0.0137, 0.25, 0.6137, 0.98])
def test_bisection_needs_9_trials_wherever_the_cliff_is(cliff):
    """2 range ends + ceil(log2(0.99 / 0.01)) = 7 halvings, independent of where the cliff lies."""

    def obj(s: float) -> dict[str, float]:
        return {"asr": 0.30 + (0.35 if s > cliff else 0.0), "clean_acc": 0.9, "robust_acc": 0.6}

    study = search(obj, bisection(), n_trials=20)
    b = bracket(trial_points(study.trials, "sparsity"))
    assert len(study.trials) == 9 and b.contains(cliff) and b.width <= 0.01, (len(study.trials), b)


def test_random_sampler_with_the_same_budget_does_not_get_there():
    """The budget claim is not trivial: 10 random probes leave a much wider bracket."""
    widths = []
    for seed in range(5):
        study = search(step_cliff, optuna.samplers.RandomSampler(seed=seed), n_trials=10)
        widths.append(bracket(trial_points(study.trials, "sparsity")).width)
    assert min(widths) > 0.01, widths


@pytest.mark.parametrize("seed", range(20))
def test_bisection_with_measurement_noise_still_brackets_the_cliff(seed):
    """Noise like a 1000-image evaluation (ASR sd 0.02, clean sd 0.01) on a cliff."""
    rng = random.Random(seed)

    def noisy(s: float) -> dict[str, float]:
        m = step_cliff(s)
        return {**m, "asr": m["asr"] + rng.gauss(0, 0.02), "clean_acc": m["clean_acc"] + rng.gauss(0, 0.01)}

    study = search(noisy, bisection(seed))
    b = bracket(trial_points(study.trials, "sparsity"))
    assert len(study.trials) <= 10
    assert b.contains(CLIFF) and b.width <= 0.01, b


def test_bisection_on_a_noisy_smooth_ramp_lands_within_the_noise_zone():
    """Where ASR rises smoothly, noise flips labels within ~0.01 of the cliff; the bracket may miss
    it by that much, not more (measured: 27 of 50 seeds contain it, worst miss 0.0104)."""
    misses = []
    for seed in range(50):
        rng = random.Random(seed)
        study = search(lambda s, rng=rng: {**ramp_cliff(s), "asr": ramp_cliff(s)["asr"] + rng.gauss(0, 0.02)},
                       bisection(seed), n_trials=12)
        b = bracket(trial_points(study.trials, "sparsity"))
        assert b.width <= 0.02
        misses.append(0.0 if b.contains(CLIFF) else min(abs(b.low - CLIFF), abs(b.high - CLIFF)))
    assert max(misses) <= 0.015, max(misses)
    assert sum(m == 0 for m in misses) >= 25


def test_isotonic_pools_violators_and_keeps_monotone_input():
    assert isotonic([1, 2, 3]) == [1, 2, 3]
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic([3, 2, 1]) == [2, 2, 2]


def test_bracket_is_the_raw_bracket_when_labels_are_monotone_and_pools_a_noisy_point():
    assert bracket([(0.0, [-0.1]), (0.3, [-0.05]), (0.5, [0.2]), (0.9, [0.5])]) == \
        bracket([(0.9, [0.5]), (0.5, [0.2]), (0.0, [-0.1]), (0.3, [-0.05])])
    b = bracket([(0.0, [-0.1]), (0.3, [-0.05]), (0.5, [0.2]), (0.9, [0.5])])
    assert (b.low, b.high, b.n_nonmonotone) == (0.3, 0.5, 0)
    # 0.4 is barely unsafe (noise) but 0.45 is clearly safe: pooled, both judged safe
    b = bracket([(0.0, [-0.1]), (0.4, [0.01]), (0.45, [-0.08]), (0.5, [0.2])])
    assert (b.low, b.high, b.n_nonmonotone) == (0.45, 0.5, 1)
    assert math.isnan(bracket([(0.0, [-0.1]), (0.9, [-0.01])]).high)  # no cliff in range


def test_parallel_trials_split_the_bracket_and_failed_values_are_not_reprobed():
    study = search(step_cliff, bisection(), n_trials=3, stop_when_converged=False)  # 0, 0.99, 0.495
    a = study.ask(SPACE)
    b = study.ask(SPACE)  # a is still RUNNING: b takes the middle of the larger remaining gap
    assert a.params["sparsity"] == pytest.approx(0.7425)
    assert b.params["sparsity"] in (pytest.approx(0.61875), pytest.approx(0.86625))
    study.tell(a, state=TrialState.FAIL)
    study.tell(b, state=TrialState.FAIL)
    c = study.ask(SPACE)
    assert c.params["sparsity"] not in (a.params["sparsity"], b.params["sparsity"])


def test_interrupted_trials_are_failed_at_startup_and_probed_again(tmp_path):
    storage = open_storage(None, tmp_path / "journal.log")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                sampler=bisection())
    t = study.ask(SPACE)  # left RUNNING, as by a SIGKILL
    assert fail_interrupted_trials(study) == 1
    frozen = study.trials[0]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs[INTERRUPTED_ATTR]
    assert study.ask(SPACE).params["sparsity"] == t.params["sparsity"]  # retried, not skipped


def test_with_a_heartbeat_only_trials_whose_launcher_is_gone_are_failed(tmp_path):
    """RDB storage with Optuna's heartbeat (search.heartbeat_interval / grace_period): a second
    launcher on the study keeps its running trial (the journal-file rule, fail every RUNNING trial,
    would kill it); a trial whose beats stopped for the grace period is failed, marked interrupted,
    and probed again. ``heartbeats`` beats for the trials of a launch while it runs."""
    import time

    from robustsweep.search import fail_stale, heartbeats

    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", tmp_path / "unused", heartbeat_interval=1,
                           grace_period=2)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize", sampler=bisection())
    dead, alive = study.ask(SPACE), study.ask(SPACE)
    storage.record_heartbeat(dead._trial_id)  # its launcher beat once, then was SIGKILLed
    with heartbeats(study, [alive]):  # the other launcher, still running its trial
        time.sleep(3.5)
        assert fail_stale(study) == 1
    states = {t.number: t for t in study.get_trials()}
    assert states[dead.number].state == TrialState.FAIL and states[dead.number].user_attrs[INTERRUPTED_ATTR]
    assert states[alive.number].state == TrialState.RUNNING
    assert fail_stale(study) == 0  # alive beat a moment ago
    assert study.ask(SPACE).params["sparsity"] == dead.params["sparsity"]  # its value is probed again


def test_constraints_asr_robust_acc_and_unmeasurable():
    crit = Criterion("asr", 0.10, 0.05)
    assert crit.constraints({"asr": 0.35, "clean_acc": 0.88}, REF) == pytest.approx([-0.05, -0.03])
    assert crit.constraints({"asr": math.nan, "clean_acc": 0.1}, REF)[0] == 1.0  # NaN -> unsafe
    rob = Criterion("robust_acc", 0.10, 0.05)
    assert rob.constraints({"robust_acc": 0.45, "clean_acc": 0.9}, REF)[0] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match=r"search\.criterion='accuracy'"):
        Criterion("accuracy")
    with pytest.raises(ConfigError, match=r"search\.delta=-0\.1"):
        Criterion("asr", -0.1)


def test_a_point_on_the_limit_is_safe_not_floating_point_noise():
    """Clean accuracy 1.00 -> 0.95 with a 0.05 allowance: 1.0 - 0.95 - 0.05 is 4.4e-17 in floating
    point, which once made the point UNSAFE and the bracket end there."""
    crit = Criterion("asr", 0.10, 0.05)
    ref = {"asr": 0.2, "clean_acc": 1.0}
    assert 1.0 - 0.95 - 0.05 > 0  # the noise this is about
    cons = crit.constraints({"asr": 0.3, "clean_acc": 0.95}, ref)  # both on their limit
    assert cons == [0.0, 0.0] and is_safe(cons)
    assert not is_safe(crit.constraints({"asr": 0.3, "clean_acc": 0.9499}, ref))  # beyond it: unsafe
    b = bracket([(0.0, crit.constraints(ref, ref)), (0.5, cons), (0.7, [0.2, 0.0])])
    assert (b.low, b.high) == (0.5, 0.7)


def test_study_with_a_different_objective_is_refused(tmp_path):
    storage = open_storage(None, tmp_path / "journal.log")
    spec = {"objective": "sparsity", "criterion": "asr", "delta": 0.1}
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    check_spec(study, spec)
    again = optuna.load_study(storage=storage, study_name="s")
    check_spec(again, dict(spec))  # same settings: continue
    with pytest.raises(ConfigError, match=r"delta: stored 0.1, now 0.2"):
        check_spec(again, {**spec, "delta": 0.2})


@pytest.mark.parametrize(("url", "fragment"), [
    ("postgresql://user:secret@localhost:1/db", "postgresql://user:***@localhost:1/db"),
    ("notadb://x", "notadb://x"),
])
def test_unopenable_storage_is_a_clear_error_without_the_password(tmp_path, url, fragment):
    with pytest.raises(ConfigError) as e:
        open_storage(url, tmp_path / "j.log")
    assert "search.storage=" in str(e.value) and fragment in str(e.value)
    assert "secret" not in str(e.value)


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"search\.sampler='cmaes'.*bisection, tpe, gp, random"):
        build_sampler("cmaes", "sparsity", constrained=True, tol=0.01, seed=0)


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_tpe_with_the_safety_constraint_finds_the_method_with_the_later_cliff(sampler):
    """Multi-dimensional: sparsity x method; method b's cliff (0.7) is later than a's (0.4)."""
    crit = Criterion("asr", 0.10, 0.05)
    space = {"sparsity": FloatDistribution(0.0, 0.99), "prune": CategoricalDistribution(["a", "b"])}
    study = optuna.create_study(direction="maximize",
                                sampler=build_sampler(sampler, "sparsity", constrained=True, tol=0.01, seed=0))
    study.enqueue_trial({"sparsity": 0.0}, user_attrs={ROLE_ATTR: "reference"})
    for _ in range(40 if sampler == "tpe" else 25):
        t = study.ask(space)
        s, method = t.params["sparsity"], t.params["prune"]
        cliff = 0.4 if method == "a" else 0.7
        m = {"asr": 0.3 + (0.3 if s > cliff else 0.0), "clean_acc": 0.9}
        record_constraints(t, crit.constraints(m, REF), crit)
        t.set_user_attr("asr", m["asr"])
        t.set_user_attr("clean_acc", m["clean_acc"])
        study.tell(t, s)
    groups = brackets_by_group(study.trials, "sparsity")
    assert set(groups) == {"prune=a", "prune=b"}
    assert groups["prune=b"].low > groups["prune=a"].low
    assert groups["prune=a"].contains(0.4) and groups["prune=b"].contains(0.7)
    assert study.best_trial.params["prune"] == "b"  # Optuna's feasibility-aware best agrees
    fig = plot_cliff(study.trials, "sparsity", crit, {**REF, "sparsity": 0.0})
    assert len(fig.axes) == 3  # two metrics + the brackets of both methods


def test_bootstrap_bracket_contains_the_bracket_and_narrows_with_more_images():
    """Paired bootstrap over images: the interval of each end holds the point bracket, and 16x the
    images give a narrower interval (noise ~ 1/sqrt(n))."""
    import numpy as np

    from robustsweep.search import Outcomes, bootstrap_bracket

    def trials(n: int) -> tuple[Outcomes, list[Outcomes]]:
        rng = np.random.default_rng(0)
        clean = rng.random(n) < 0.9

        def at(x: float) -> Outcomes:  # ASR rises linearly with sparsity: 0.2 at 0, 0.6 at 0.8
            return Outcomes(x, clean, clean & (rng.random(n) >= 0.2 + 0.5 * x))
        return at(0.0), [at(x) for x in np.linspace(0.05, 0.8, 16)]

    crit = Criterion("asr", delta=0.10, delta_acc=0.05)
    widths = []
    for n in (200, 3200):
        ref, ts = trials(n)
        def metrics(o: Outcomes) -> dict[str, float]:
            return {"asr": float((o.clean_ok & ~o.adv_ok).sum() / o.clean_ok.sum()),
                    "clean_acc": float(o.clean_ok.mean())}
        point = bracket([(ref.x, [0.0, 0.0])] + [(t.x, crit.constraints(metrics(t), metrics(ref))) for t in ts])
        b = bootstrap_bracket(ref, ts, crit, n_boot=300)
        assert b["cliff_low_ci_lo"] <= point.low <= b["cliff_low_ci_hi"]
        assert b["cliff_high_ci_lo"] <= point.high <= b["cliff_high_ci_hi"]
        widths.append(b["cliff_high_ci_hi"] - b["cliff_low_ci_lo"])
    assert widths[1] < widths[0]


def test_paired_intervals_decide_unsafe_only_when_the_whole_interval_is_past_the_allowance():
    """Issue 29: with the paired evaluator's intervals, a point rise of 0.12 > delta 0.10 whose
    interval reaches down to 0.05 is not called unsafe; one whose interval starts at 0.11 is."""
    crit = Criterion(metric="asr", delta=0.10, delta_acc=0.05)
    ref = {"asr": 0.3, "clean_acc": 0.9, "robust_acc": 0.6}
    point = {"asr": 0.42, "clean_acc": 0.9, "robust_acc": 0.5}
    assert not is_safe(crit.constraints(point, ref))  # the old rule: the point decides
    paired = {**point, "delta_asr_common": 0.12, "delta_asr_common_lo": 0.05, "delta_asr_common_hi": 0.19,
              "delta_clean_acc": 0.0, "delta_clean_acc_lo": -0.01, "delta_clean_acc_hi": 0.01}
    assert is_safe(crit.constraints(paired, ref))
    assert not is_safe(crit.constraints({**paired, "delta_asr_common_lo": 0.11}, ref))
    # the clean criterion the same way: a fall whose interval reaches -0.04 is not past 0.05
    assert is_safe(crit.constraints({**paired, "delta_clean_acc_hi": -0.04}, ref))
    assert not is_safe(crit.constraints({**paired, "delta_clean_acc_hi": -0.06}, ref))
    rob = Criterion(metric="robust_acc", delta=0.10)
    assert is_safe(rob.constraints({**paired, "delta_robust_acc_hi": -0.09}, ref))
    assert not is_safe(rob.constraints({**paired, "delta_robust_acc_hi": -0.11}, ref))


@pytest.mark.parametrize("metric,ref,fragment", [
    ("asr", {"asr": 1.0, "clean_acc": 0.9}, "ASR cannot rise"),
    ("asr", {"asr": 0.95, "clean_acc": 0.9}, "ASR cannot rise"),
    ("robust_acc", {"robust_acc": 0.02, "clean_acc": 0.9}, "cannot fall"),
    ("asr", {"asr": 0.5, "clean_acc": 0.03}, "clean accuracy is 0.030"),
])
def test_a_reference_that_leaves_nothing_to_detect_is_unidentifiable(metric, ref, fragment):
    assert any(fragment in w for w in Criterion(metric=metric, delta=0.1).unidentifiable(ref))


def test_a_reference_with_room_is_identifiable():
    assert Criterion().unidentifiable({"asr": 0.3, "clean_acc": 0.9, "robust_acc": 0.6}) == []
