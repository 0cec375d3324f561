"""``-m search=cliff`` through the real command line: the study, its MLflow parent, resume, refusal,
SIGKILL + relaunch, and bad input rejected before any trial runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from robustsweep.search import INTERRUPTED_ATTR
from robustsweep.tracking.store import exact_metrics
from robustsweep.tracking.sweep import ROLE_TAG
from tests.forked_cli import run_many
from tests.test_cli import REPO, cli

pytestmark = pytest.mark.slow
SEARCH = ["-m", "experiment=quickstart", "search=cliff", "train.epochs=8", "attribution.n_images=2",
          "attribution.n_steps=16"]


def _study(root: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(root / "outputs" / "optuna" / "journal.log")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _runs(root: Path, role: str) -> list:
    c = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    exp = c.get_experiment_by_name("robustsweep").experiment_id
    return c.search_runs([exp], f"tags.`{ROLE_TAG}` = '{role}'", max_results=1000)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    p = cli(root, *SEARCH)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return root


def test_cliff_search_is_a_study_with_a_parent_run_and_trial_children(searched):
    study = _study(searched)
    trials = study.trials
    assert 3 <= len(trials) <= 10 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].params["sparsity"] == 0.0 and trials[0].user_attrs["robustsweep.role"] == "reference"
    (parent,) = _runs(searched, "study")
    m = parent.data.metrics
    assert parent.info.status == "FINISHED"
    assert m["cliff_width"] == pytest.approx(m["cliff_high"] - m["cliff_low"])
    assert m["cliff_width"] <= 0.01 and m["best_safe_sparsity"] == m["cliff_low"]
    assert parent.data.tags["optuna.study_name"] == study.study_name
    children = _runs(searched, "cell")
    assert len(children) == len(trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(len(trials)))
    # the parent's bracket is what the trials say: highest safe below the lowest unsafe
    safe = [t.params["sparsity"] for t in trials if max(t.user_attrs["constraints"]) <= 0]
    unsafe = [t.params["sparsity"] for t in trials if max(t.user_attrs["constraints"]) > 0]
    assert m["cliff_low"] == max(safe) and m["cliff_high"] == min(unsafe)
    c = MlflowClient(f"sqlite:///{searched}/outputs/mlflow.db")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "search")}
    assert {"search/cliff.png", "search/trials.csv", "search/cliff.json"} <= arts
    sweep_dir = Path(parent.data.tags["hydra.sweep.dir"])
    result = json.loads((sweep_dir / "cliff.json").read_text())
    assert result["metrics"]["cliff_low"] == m["cliff_low"]
    # each trial was judged by the 95 % interval of its paired differences against the dense model
    # (issue 29): unsafe only when the whole interval is past the allowance
    for t in trials[1:]:
        if max(t.user_attrs["constraints"]) > 0:
            (child,) = [c for c in children if int(c.data.tags["optuna.trial_number"]) == t.number]
            cm = exact_metrics(child)  # the values the decision used, not the UI's 4 digits
            assert cm["delta_asr_common_lo"] > 0.10 or cm["delta_clean_acc_hi"] < -0.05 or cm["collapsed"]
    # so the bracket needs no bootstrap of its own (that resampled the point rule)
    assert "bootstrap" not in result and "cliff_low_ci_lo" not in m


def test_relaunch_continues_the_study_and_a_changed_objective_is_refused(searched):
    n_before = len(_study(searched).trials)
    (parent,) = _runs(searched, "study")
    p = cli(searched, *SEARCH)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "continuing study" in p.stdout + p.stderr
    assert len(_study(searched).trials) == n_before  # already converged: nothing new to run
    assert [r.info.run_id for r in _runs(searched, "study")] == [parent.info.run_id]

    p = cli(searched, *SEARCH, "search.delta=0.2", f"search.study_name={_study(searched).study_name}")
    assert p.returncode != 0
    assert "exists with a different objective" in p.stdout + p.stderr
    assert "delta: stored 0.1, now 0.2" in p.stdout + p.stderr
    assert len(_study(searched).trials) == n_before


def test_sigkill_mid_search_then_relaunch_continues_from_the_stored_trials(tmp_path):
    # FGSM trials (tests.faults' ``fault`` attack), except that in the first launch every trial from
    # number 3 on hangs in its attack: the kill lands mid-trial after exactly 3 told trials, and the
    # relaunch (without the fault) runs seconds-long trials, not a PGD-300 each.
    args = [sys.executable, "-m", "robustsweep", *SEARCH, "attribution=none", "attack=fgsm",
            "attack.name=fault", "+hydra.callbacks.faults._target_=tests.faults.Faults"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)  # the job process imports tests.faults
    first = {**env, "ROBUSTSWEEP_TEST_FAULT": "hang", "ROBUSTSWEEP_TEST_FAULT_FROM_JOB": "3"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=first, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("outputs/multiruns/*/*/3")):
            time.sleep(0.2)
        time.sleep(1.0)  # trial 3 hangs in its attack; trials 0-2 are told
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = _study(tmp_path).trials
    n_told = sum(t.state == TrialState.COMPLETE for t in killed)
    assert n_told == 3 and any(t.state == TrialState.RUNNING for t in killed)

    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "marked 1 trial(s) left RUNNING" in out and f"{n_told} finished trial(s) count" in out
    trials = _study(tmp_path).trials
    interrupted = [t for t in trials if t.user_attrs.get(INTERRUPTED_ATTR)]
    assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    # the stored trials were kept, not re-run: same parameters, same results
    for old in killed[:n_told]:
        assert trials[old.number].params == old.params and trials[old.number].values == old.values
    # the interrupted value was probed again, and the study converged
    assert any(t.params == interrupted[0].params and t.state == TrialState.COMPLETE for t in trials)
    (parent,) = _runs(tmp_path, "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics["cliff_width"] <= 0.01
    assert all(r.info.status in ("FINISHED", "FAILED") for r in _runs(tmp_path, "cell"))


# Real commands, each in its own process forked after the imports (tests/forked_cli.py)
BAD_SEARCH = [
    (["sparsity=interval(0.9,0.1)"], "sparsity=interval(0.9, 0.1) is empty or inverted"),
    (["sparsity=interval(0,1.5)"], "sparsity=1.5 is not valid; allowed: a float in [0, 1)"),
    (["search.sampler=cmaes"], "expected one of [bisection, tpe, gp, random]"),
    (["search.storage=postgresql://u:secret@localhost:1/db"], "search.storage='postgresql://u:***@"),
    (["search.objective=accuracy"], "search.objective='accuracy' is neither a searched key"),
    (["search.criterion=accuracy"], "expected one of [asr, robust_acc]"),
    (["prune=l1_unstructured,global_l1"], "search.sampler=bisection searches one linear float key"),
    (["search.sampler=tpe", "epsilon=0.05,0.1"], "searching epsilon would change the dense reference"),
    (["search.n_trials=0"], "search.n_trials=0 is not valid"),
]


@pytest.fixture(scope="module")
def bad_search_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    dirs = [tmp_path_factory.mktemp("bad-search") for _ in BAD_SEARCH]
    runs = run_many([{"args": [*SEARCH, *args], "cwd": d}
                     for (args, _), d in zip(BAD_SEARCH, dirs, strict=True)])
    return {" ".join(args): (d, p) for (args, _), d, p in zip(BAD_SEARCH, dirs, runs, strict=True)}


@pytest.mark.parametrize(("args", "fragment"), BAD_SEARCH)
def test_bad_search_input_fails_before_any_trial(bad_search_runs, args, fragment):
    tmp_path, p = bad_search_runs[" ".join(args)]
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert fragment in out, out[-2000:]
    assert "secret" not in out
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    assert not (tmp_path / "outputs" / "multiruns").exists() or not list(
        (tmp_path / "outputs" / "multiruns").glob("*/*/0"))  # no job ran


# ---- in-process: the real CLI and sweeper, with the job replaced by a synthetic objective --------
def fake_job(fail: Callable[[float], bool] = lambda s: False, drop: str | None = None, base_asr: float = 0.3):
    """A stand-in for robustsweep.pipeline.run: ASR jumps at 0.6137; raises where ``fail(s)``."""

    def run(cfg):
        s = float(cfg.sparsity)
        if fail(s):
            raise RuntimeError(f"injected failure at sparsity {s}")
        m = {"asr": min(1.0, base_asr + (0.35 if s > 0.6137 else 0.0)), "clean_acc": 0.9, "robust_acc": 0.6}
        m.pop(drop, None)
        return m

    return run


def run_cli(monkeypatch, tmp_path: Path, job, *args: str) -> int:
    """``python -m robustsweep -m experiment=quickstart search=cliff ...`` in this process."""
    from hydra.core.global_hydra import GlobalHydra

    import robustsweep.__main__ as cli_main
    import robustsweep.pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(robustsweep.pipeline, "run", job)
    monkeypatch.setattr(sys, "argv", ["robustsweep", "-m", "experiment=quickstart", "search=cliff",
                                      "hydra/job_logging=none", *args])
    try:
        cli_main.main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        GlobalHydra.instance().clear()


def test_a_failed_trial_is_recorded_and_the_search_goes_around_it(monkeypatch, tmp_path):
    rc = run_cli(monkeypatch, tmp_path, fake_job(fail=lambda s: 0.45 < s < 0.55))
    assert rc == 0
    trials = _study(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "injected failure" in failed[0].user_attrs["error"]
    assert sum(t.params["sparsity"] == failed[0].params["sparsity"] for t in trials) == 1  # not re-probed
    (parent,) = _runs(tmp_path, "study")
    m = parent.data.metrics
    assert m["cliff_low"] <= 0.6137 <= m["cliff_high"] and m["cliff_width"] <= 0.01
    assert m["n_failed"] == 1


def test_too_many_failed_trials_stop_the_study(monkeypatch, tmp_path):
    rc = run_cli(monkeypatch, tmp_path, fake_job(fail=lambda s: s > 0), "search.n_trials=8",
                 "search.max_failure_rate=0.25")
    assert rc != 0
    trials = _study(tmp_path).trials
    assert sum(t.state == TrialState.FAIL for t in trials) == 3  # 3 > 0.25 x 8: stop
    assert len(trials) == 4  # the reference + 3 failures, then nothing more
    (parent,) = _runs(tmp_path, "study")
    assert parent.info.status == "FAILED"


def test_a_criterion_metric_the_job_does_not_return_stops_before_any_other_trial(monkeypatch, tmp_path):
    rc = run_cli(monkeypatch, tmp_path, fake_job(drop="asr"))
    assert rc != 0
    trials = _study(tmp_path).trials
    assert len(trials) == 1  # only the reference ran


def test_a_saturated_reference_warns_at_once_and_tags_the_study(monkeypatch, tmp_path, capfd):
    """Issue 29: a dense ASR of 1.0 (AutoAttack at 8/255) leaves "ASR rises by delta" nothing to
    detect: the search warns as soon as the reference is known, tags the study and its parent run
    ``cliff_unidentifiable`` with the reason, and cliff.json says so."""
    rc = run_cli(monkeypatch, tmp_path, fake_job(base_asr=1.0), "search.n_trials=4")
    assert rc == 0
    study = _study(tmp_path)
    assert "dense model's ASR is 1.000" in study.user_attrs["cliff_unidentifiable"]
    out = "".join(capfd.readouterr())
    assert -1 < out.find("cliff unidentifiable") < out.find("trial 1 ")  # before any other trial ran
    (parent,) = _runs(tmp_path, "study")
    assert "ASR cannot rise" in parent.data.tags["robustsweep.cliff_unidentifiable"]
    sweep_dir = Path(parent.data.tags["hydra.sweep.dir"])
    assert "ASR cannot rise" in json.loads((sweep_dir / "cliff.json").read_text())["cliff_unidentifiable"]


def test_a_reference_with_room_is_not_tagged(monkeypatch, tmp_path):
    assert run_cli(monkeypatch, tmp_path, fake_job(), "search.n_trials=4") == 0
    assert "cliff_unidentifiable" not in _study(tmp_path).user_attrs
