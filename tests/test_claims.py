"""Several launchers, one store: per-run staging, claimed cells, orphans that stop, exit statuses that
tell the truth (issue 27). The claim itself is unit-tested against a real SQLite MLflow store; the rest
runs the real CLI in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from robustsweep.core import process
from robustsweep.tracking import claims
from robustsweep.tracking.sweep import CELL_TAG, ERROR_TAG, ROLE_TAG
from tests.test_cli import REPO, cli
from tests.test_sweep import _runs


@pytest.fixture
def client(tmp_path):
    from robustsweep.tracking import store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return store.Client(uri)


def _dead_identity() -> str:
    """The identity of a process that has exited (its pid may be reused: the start time tells)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    ident = process.identity(p.pid)
    p.wait()
    return ident


def test_claim_is_exclusive_and_released(client):
    a, b = claims.Claim(client, "1", "c0ffee", 60), claims.Claim(client, "1", "c0ffee", 60)
    assert a.try_acquire() and a.held()
    assert not b.try_acquire()  # a live holder on this machine: b must wait
    assert b.holder is not None and b.holder.owner == process.identity()
    a.release()
    assert not a.held() and client.search_registered_models() == []
    assert b.try_acquire() and b.held()
    b.release()


def test_a_dead_holder_is_taken_over_at_once_and_loses_its_claim(client):
    client.create_registered_model(f"{claims.PREFIX}-1-c0ffee-0",
                                   tags={claims.OWNER: _dead_identity(), claims.BEAT: str(time.time()),
                                         claims.LEASE: "60", claims.RUN: "r"})
    c = claims.Claim(client, "1", "c0ffee", 60)
    assert c.try_acquire() and c.name.endswith("-1")  # the next generation, though the beat is fresh
    assert [m.name for m in client.search_registered_models()] == [c.name]  # the stale one deleted
    c.release()


def test_another_machines_claim_lives_by_its_heartbeat(client):
    remote = "other-host|123|boot:1"
    for gen, beat in ((0, time.time() - 600), (1, time.time())):  # 0: lapsed long ago, 1: fresh
        client.create_registered_model(f"{claims.PREFIX}-1-beef-{gen}", tags={
            claims.OWNER: remote, claims.BEAT: str(beat), claims.LEASE: "60", claims.RUN: ""})
    c = claims.Claim(client, "1", "beef", 60)
    assert not c.try_acquire() and c.holder.generation == 1  # the highest generation is the authority
    client.set_registered_model_tag(f"{claims.PREFIX}-1-beef-1", claims.BEAT, str(time.time() - 61))
    assert c.try_acquire() and c.name.endswith("-2")
    c.release()


def test_holder_learns_that_it_lost_the_claim(client):
    a = claims.Claim(client, "1", "feed", 60)
    assert a.try_acquire()
    # another machine takes over (as if a had been stopped for longer than its lease)
    client.create_registered_model(f"{claims.PREFIX}-1-feed-1", tags={claims.OWNER: "other|1|b:1",
                                                                     claims.BEAT: str(time.time())})
    assert not a.held()
    a.release()


# ---------------------------------------------------------------------------------- the real CLI
EPS = 0.1
QUICK = ["experiment=quickstart", "attribution=none", "train.epochs=3", "data.n_eval=60"]
FAULTS = "+hydra.callbacks.faults._target_=tests.faults.Faults"


def _popen(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "robustsweep", *args], cwd=root, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cells(root: Path):
    return [r for r in _runs(root) if r.data.tags.get(ROLE_TAG) == "cell"]


def _artifact(run, name: str) -> str:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name)).read_text()


@pytest.mark.slow
def test_two_launches_sharing_a_job_folder_keep_their_own_artifacts(tmp_path):
    """Two single runs forced into one Hydra folder (as two launches in the same second were): each
    run's config.yaml and outcomes.csv are its own."""
    shared = tmp_path / "same"
    procs = [_popen(tmp_path, *QUICK, f"sparsity={s}", f"hydra.run.dir={shared}") for s in ("0.25", "0.75")]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = [r for r in _cells(tmp_path) if r.data.params["sparsity"] in ("0.25", "0.75")]
    assert len(runs) == 2
    for r in runs:
        assert yaml.safe_load(_artifact(r, "config.yaml"))["sparsity"] == float(r.data.params["sparsity"])
        rows = _artifact(r, "outcomes.csv").splitlines()[1:]
        header = _artifact(r, "outcomes.csv").splitlines()[0].split(",")
        correct = sum(int(row.split(",")[header.index("label")] == row.split(",")[header.index("clean_pred")])
                      for row in rows)
        assert correct == r.data.metrics["n_correct"], r.data.params["sparsity"]
    # and by default two launches never share a folder: the folder names carry the launcher's pid
    ids = [subprocess.run([sys.executable, "-c", "from robustsweep.core.schema import launch_id; "
                           "print(launch_id())"], capture_output=True, text=True, check=True).stdout
           for _ in range(2)]
    assert ids[0] != ids[1]


@pytest.mark.slow
def test_overlapping_sweeps_compute_each_cell_once(tmp_path):
    """Two sweeps started together whose grids share two cells: every cell one FINISHED run, no run
    FAILED (no live run marked dead), both commands succeed."""
    # Both grids start with the shared cell 0.5, which takes >= 10 s (fault "slow"): one sweep must wait.
    env = {"PYTHONPATH": str(REPO), "ROBUSTSWEEP_TEST_FAULT": "slow"}
    slow = [f"epsilon={EPS}", "attack.name=fault", f"+attack.fault_eps={EPS}", FAULTS]
    procs = [_popen(tmp_path, "-m", *QUICK, *slow, f"sparsity={grid}", env=env)
             for grid in ("0.5,0.6,0.25", "0.5,0.6,0.7")]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    cells = _cells(tmp_path)
    assert [r.info.status for r in cells].count("FAILED") == 0, [r.data.tags.get(ERROR_TAG) for r in cells]
    ids = [r.data.tags[CELL_TAG] for r in cells if r.info.status == "FINISHED"]
    assert len(ids) == len(set(ids)) == 4  # sparsity 0.25, 0.5, 0.6, 0.7
    assert any("being computed by" in out for out in outs)  # one of them waited for the other
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    assert mlflow.MlflowClient().search_registered_models() == []  # every claim released


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_killed_joblib_launcher_takes_its_workers_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the relaunch's jobs import tests.faults too
    env = {"ROBUSTSWEEP_TEST_FAULT": "hang"}
    args = ["-m", *QUICK, "epsilon=0.05,0.1", "attack.name=fault", f"+attack.fault_eps={EPS}",
            "+hydra.callbacks.faults._target_=tests.faults.Faults", "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2"]
    launcher = _popen(tmp_path, *args, env=env)
    deadline = time.time() + 300
    # The hanging cell is RUNNING and the other FINISHED, so one worker computes and one is idle: both
    # must go (an idle loky worker once outlived its launcher). Job folder first: the store exists.
    while time.time() < deadline:
        status = {r.data.params.get("epsilon"): r.info.status for r in _cells(tmp_path)} \
            if list(tmp_path.glob("outputs/multiruns/*/*/1")) else {}
        if status.get("0.1") == "RUNNING" and status.get("0.05") == "FINISHED":
            break
        time.sleep(1)
    else:
        pytest.fail("no RUNNING cell within 300 s: " + launcher.communicate(timeout=60)[0][-3000:])
    workers = _children(launcher.pid)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(process.started_at(w) for w in workers):
        time.sleep(0.5)
    assert not [w for w in workers if process.started_at(w)], "orphaned workers still running"
    hung = next(r for r in _cells(tmp_path) if r.data.params.get("epsilon") == "0.1")
    assert hung.info.status == "FAILED" and "launcher process gone" in hung.data.tags[ERROR_TAG]
    # the relaunch runs what is missing at once (no lease to wait for) and nothing twice
    p = cli(tmp_path, *args[:-2])
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    finished = [r.data.tags[CELL_TAG] for r in _cells(tmp_path) if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "code", "status"), [("summary_oserror", 1, "FAILED"),
                                                        ("summary_interrupt", 130, "KILLED")])
def test_a_sweep_whose_summary_fails_says_so(tmp_path, monkeypatch, fault, code, status):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("ROBUSTSWEEP_TEST_FAULT", fault)
    p = cli(tmp_path, "-m", *QUICK, "sparsity=0", FAULTS)
    out = p.stdout + p.stderr
    assert p.returncode == code, out[-3000:]
    assert "Traceback" not in out
    assert ("No space left on device" if fault == "summary_oserror" else "marked KILLED") in out
    (parent,) = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert parent.info.status == status


@pytest.mark.slow
def test_joblib_with_no_workers_is_refused_before_anything(tmp_path):
    p = cli(tmp_path, "-m", *QUICK, "sparsity=0,0.5", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "hydra.launcher.n_jobs=0" in out and "Traceback" not in out
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_unwritable_artifact_dir_is_refused_before_any_run(tmp_path, make_cfg):
    from robustsweep.core.errors import ConfigError
    from robustsweep.tracking import store

    bad = tmp_path / "a-file"
    bad.write_text("not a folder")
    cfg = make_cfg(f"tracking.artifact_dir={bad}/sub")
    with pytest.raises(ConfigError, match=r"tracking\.artifact_dir"):
        store.preflight(cfg)
    # an experiment created (by older code) with a bad location: refused, naming the experiment
    good = make_cfg()
    store.preflight(good)
    uri = store.resolve_tracking_uri(good.tracking.uri)
    store.ensure_store(uri)
    mlflow.MlflowClient(uri).create_experiment("stuck", artifact_location=(bad / "sub").as_uri())
    with pytest.raises(ConfigError, match=r"tracking\.experiment=.stuck."):
        store.preflight(make_cfg("tracking.experiment=stuck"))
