"""Several processes, one MLflow store: fresh-store creation, concurrent writers, parallel jobs,
``hydra.job.chdir``; and an unwritable or full output folder stops everything up front."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import namedtuple

import pytest
from mlflow.tracking import MlflowClient

from robustsweep.config import ConfigError, validate
from robustsweep.tracking import store as tracking
from robustsweep.tracking.sweep import CELL_TAG, ROLE_TAG
from tests import forked_cli
from tests.test_cli import REPO, cli


def _workers(uri: str, n_workers: int, n_metrics: int) -> list[subprocess.CompletedProcess]:
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.store_worker", uri, f"w{i}", str(n_metrics)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n_workers)]
    outs = [p.communicate(timeout=300) for p in procs]  # drains the pipes while waiting
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


@pytest.mark.slow
def test_two_writers_on_a_fresh_store_lose_nothing(tmp_path):
    """2 processes x 200 single-metric calls, starting together on a store that does not exist
    yet (MLflow's schema migration races without the lock)."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    done = _workers(uri, 2, 200)
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("stress").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["w0", "w1"]
    for r in runs:
        assert r.info.status == "FINISHED"
        hist = c.get_metric_history(r.info.run_id, "m")
        assert sorted(m.step for m in hist) == list(range(200))


@pytest.mark.slow
def test_four_processes_create_one_fresh_store_without_racing(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    for p in _workers(uri, 4, 1):
        assert p.returncode == 0, p.stderr[-3000:]


def test_locked_database_is_retried_other_errors_are_not(monkeypatch):
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return x * 2
    assert tracking.retry_locked(flaky, 21) == 42 and len(calls) == 3

    def broken():
        calls.append(0)
        raise ValueError("no such table: runs")
    calls.clear()
    with pytest.raises(ValueError):
        tracking.retry_locked(broken)
    assert len(calls) == 1

    def always_locked():
        raise OperationalError("UPDATE ...", {}, Exception("database is locked"))
    with pytest.raises(OperationalError):
        tracking.retry_locked(always_locked, attempts=4)


def test_client_methods_go_through_the_retry(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(tracking, "retry_locked", lambda fn, *a, **k: seen.append(fn.__name__) or fn(*a, **k))
    c = tracking.Client(f"sqlite:///{tmp_path}/m.db")
    c.search_experiments()
    assert seen == ["search_experiments"]


@pytest.mark.slow
def test_joblib_launcher_four_workers_all_cells_and_metrics_stored_one_baseline_trained(tmp_path):
    """4 joblib workers on a fresh store: every cell and metric stored; the baseline they all need is
    trained once (the others wait on its cache file's lock and load it); each worker takes its share
    of the cores (without OMP_NUM_THREADS, which pytest-xdist's conftest sets)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-m", "robustsweep", "-m", "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=4", "sparsity=0,0.25,0.5,0.75", "train.epochs=3",
                        "attribution.n_images=2", "attribution.n_steps=8"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "4 cells on JoblibLauncher, 4 at a time; each job logs to" in p.stdout + p.stderr
    # the workers print to the launching terminal themselves (loky inherits it): no relayed copies
    assert len(re.findall(r"\] - cell .+: run \w+ FINISHED in", p.stdout + p.stderr)) == 4
    assert not re.search(r"job \d: cell .+ FINISHED in", p.stdout + p.stderr)
    logs = [f.read_text() for f in tmp_path.glob("outputs/multiruns/*/*/*/*.log")]
    assert len(logs) == 4
    assert sum("] - training baseline" in t for t in logs) == 1, [t[-1500:] for t in logs]
    assert sum("] - waiting for another process training baseline" in t for t in logs) >= 1
    # joblib's loky sets OMP_NUM_THREADS = cores // n_jobs in its workers; we log what the job runs with
    cores = len(os.sched_getaffinity(0))
    threads = [re.search(r"torch threads: (\d+) \(", t) for t in logs]
    assert all(m and int(m.group(1)) == max(1, cores // 4) for m in threads), logs[0][-2000:]
    c = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("robustsweep").experiment_id])
    cells = [r for r in runs if r.data.tags.get(ROLE_TAG) == "cell"]
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(cells) == 4 and len({r.data.tags[CELL_TAG] for r in cells}) == 4
    assert all(r.info.status == "FINISHED" for r in [*cells, parent])
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells)
    n_metrics = {len(r.data.metrics) for r in cells}
    n_params = {len(r.data.params) for r in cells}
    assert len(n_metrics) == 1 and len(n_params) == 1 and min(n_metrics) >= 20, (n_metrics, n_params)
    pids = {r.data.tags.get("hydra.output_dir") for r in cells}
    assert len(pids) == 4


@pytest.mark.slow
def test_relative_tracking_uri_with_job_chdir_is_one_store(tmp_path):
    p = cli(tmp_path, "-m", "hydra.job.chdir=true", "sparsity=0,0.5", "train.epochs=3",
            "attribution=none", "tracking.uri=sqlite:///store/mlflow.db")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    dbs = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.db"))
    assert dbs == ["store/mlflow.db"]
    c = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("robustsweep").experiment_id])
    assert sorted(r.data.tags.get(ROLE_TAG) for r in runs) == ["cell", "cell", "sweep"]
    # The same for a relative MLFLOW_TRACKING_URI, with the jobs in joblib worker processes (in
    # the basic launcher's single process MLflow's cached connection would hide a wrong path).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run([sys.executable, "-m", "robustsweep", "-m", "hydra.job.chdir=true",
                        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sparsity=0,0.5",
                        "train.epochs=3", "attribution=none"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**env, "MLFLOW_TRACKING_URI": "sqlite:///envstore/m.db"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    dbs = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.db"))
    assert dbs == ["envstore/m.db", "store/mlflow.db"], dbs
    c = MlflowClient(f"sqlite:///{tmp_path}/envstore/m.db")
    runs = c.search_runs([c.get_experiment_by_name("robustsweep").experiment_id])
    assert sorted(r.data.tags.get(ROLE_TAG) for r in runs) == ["cell", "cell", "sweep"]


def test_relative_uris_resolve_against_the_launch_dir_not_the_cwd(tmp_path, monkeypatch):
    import robustsweep.core.paths as config_mod

    job_dir = tmp_path / "outputs" / "multiruns" / "0"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)  # what hydra.job.chdir=true does to a job
    monkeypatch.setattr(config_mod, "launch_dir", lambda: tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///a/m.db") == f"sqlite:///{tmp_path}/a/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///b/m.db")
    assert tracking.resolve_tracking_uri("sqlite:///a/m.db") == f"sqlite:///{tmp_path}/b/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.resolve_tracking_uri("sqlite:///a/m.db") == "http://server:5000"


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_full_disk_is_a_clear_error_before_any_run(make_cfg, tmp_path, monkeypatch):
    from robustsweep.pipeline import run

    monkeypatch.setattr(tracking.shutil, "disk_usage", lambda p: DiskUsage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError, match=r"paths.output_dir: only 1 MB free .* at least 200 MB"):
        run(make_cfg())
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "grid", "cliff"])
def test_unwritable_output_dir_is_a_clear_error_at_start(tmp_path, mode):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = {"run": [], "grid": ["-m", "sparsity=0,0.5"], "cliff": ["-m", "search=cliff"]}[mode]
    p = forked_cli.run([*args, "paths.output_dir=blocker/out", "tracking.uri=sqlite:///store/mlflow.db"],
                       tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "paths.output_dir: cannot write to" in out and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "store" / "mlflow.db").exists()


def test_metrics_shown_rounded_kept_exact_across_chunked_tags(tmp_path):
    """The UI gets 4 significant digits; the store keeps the exact values (split over several tags
    past MLflow's 8000 characters) and ``exact_metrics`` gives them back bit for bit."""
    assert tracking.shown(0.9166666666666666) == 0.9167 and tracking.shown(12345.0) == 12345.0
    assert tracking.shown(1 / 3 * 1e-5) == 3.333e-6 and math.isnan(tracking.shown(math.nan))
    metrics = {f"certified_acc_at_{i / 100:.2f}": i / 7 for i in range(400)}  # ~13000 chars of JSON
    metrics |= {"n_correct": 94.0, "asr": math.nan}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    shown, exact = tracking.metric_batch(metrics, 0)
    assert len(exact) >= 2 and all(len(t.value) <= 8000 for t in exact)
    client.log_batch(run_id, metrics=shown, tags=exact)
    r = client.get_run(run_id)
    assert r.data.metrics["certified_acc_at_0.01"] == 0.1429 and r.data.metrics["n_correct"] == 94
    back = tracking.exact_metrics(r)
    assert math.isnan(back.pop("asr")) and back == {k: v for k, v in metrics.items() if k != "asr"}


@pytest.mark.parametrize(("over", "name"), [
    (["epsilon=8/255"], "s0.25 fgsm 8/255 | l1_unstructured small_cnn"),
    (["epsilon=0.05"], "s0.25 fgsm 0.05 | l1_unstructured small_cnn"),  # digits' budgets stay decimal
    (["epsilon=0.2"], "s0.25 fgsm 0.2 | l1_unstructured small_cnn"),  # = 51/255, but typed as 0.2
    (["epsilon=0.0123456"], "s0.25 fgsm 0.0123 | l1_unstructured small_cnn"),
    (["attack=pgd", "attack.norm=l2", "epsilon=0.5", "attack.step_size=0.1"],
     "s0.25 pgd L2 0.5 | l1_unstructured small_cnn"),
])
def test_run_names_lead_with_what_differs(make_cfg, over, name):
    assert tracking.run_name(validate(make_cfg("sparsity=0.25", *over))) == name
