"""Sweeps as MLflow parent + children: resume by cell_id, failures recorded, summary, report."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from robustsweep.config import compose
from robustsweep.summary import wilson
from robustsweep.tracking.identity import cell_id
from robustsweep.tracking.sweep import CELL_TAG, ERROR_TAG, ROLE_TAG
from tests import forked_cli
from tests.test_cli import REPO, cli

pytestmark = pytest.mark.slow
GRID = ["-m", "sparsity=0,0.5", "epsilon=0.05,0.1", "train.epochs=5", "attribution.n_images=2",
        "attribution.n_steps=16", "min_norm=bisect", "min_norm.n_bisect=3"]


def _client(root: Path) -> tuple[MlflowClient, str]:
    c = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    return c, c.get_experiment_by_name("robustsweep").experiment_id


def _runs(root: Path, status: str | None = None):
    c, exp = _client(root)
    flt = f"attributes.status = '{status}'" if status else ""
    return c.search_runs([exp], flt, max_results=1000)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    p = cli(root, *GRID)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return root


def test_sweep_is_one_parent_with_children_and_a_summary(swept):
    runs = _runs(swept)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "cell"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hydra.sweep.dir"] and "sparsity=0,0.5" in parent.data.tags["hydra.overrides"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags[CELL_TAG] for c in children}) == 4
    client, _ = _client(swept)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/heatmap_asr.png", "summary/heatmap_robust_acc.png", "summary/curves.png",
            "summary/attention_drift.png", "summary/security_curves.png", "summary/pareto.png",
            "summary/tradeoff.png", "summary/cells.csv"} <= files
    text = Path(client.download_artifacts(parent.info.run_id, "summary/cells.csv")).read_text()
    assert len(list(csv.DictReader(io.StringIO(text)))) == 4
    # the same files stay on disk in the sweep's folder (the log names it)
    on_disk = Path(parent.data.tags["hydra.sweep.dir"]) / "summary" / "cells.csv"
    if not on_disk.is_absolute():
        on_disk = swept / on_disk
    assert on_disk.read_text() == text


def test_relaunch_skips_finished_cells_and_reuses_the_parent(swept):
    p = cli(swept, *GRID)
    assert p.returncode == 0
    assert "4 already FINISHED in the store (skipped), 0 to run" in p.stdout + p.stderr
    assert len(_runs(swept, "FINISHED")) == 5  # 4 cells + the same parent
    assert len([r for r in _runs(swept) if r.data.tags.get(ROLE_TAG) == "sweep"]) == 1


def test_report_rebuilds_the_summary_from_the_store(swept, tmp_path):
    p = forked_cli.run(["--out", str(tmp_path / "r")], swept, module="robustsweep.report", timeout=300)
    assert p.returncode == 0, p.stderr
    assert {f.name for f in (tmp_path / "r").iterdir()} >= {
        "heatmap_asr.png", "heatmap_robust_acc.png", "curves.png", "attention_drift.png", "cells.csv"}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "cells.csv").read_text())))
    assert len(rows) == 4 and all(0 <= float(r["asr"]) <= 1 for r in rows)


@pytest.mark.parametrize("args", [["--experiment", "nope"], ["--parent-run-id", "0123abcd"],
                                  ["--tracking-uri", "sqlite:///missing/store.db"]])
def test_report_bad_input_exits_2_and_modifies_nothing(swept, args):
    db = swept / "outputs" / "mlflow.db"
    before = db.stat().st_mtime_ns
    p = forked_cli.run(args, swept, module="robustsweep.report", timeout=300)
    assert p.returncode == 2 and p.stderr.strip(), p.stderr
    assert db.stat().st_mtime_ns == before
    assert not (swept / "missing").exists()


def test_stale_running_run_is_failed_and_the_cell_rerun(tmp_path):
    p = cli(tmp_path, *GRID)
    assert p.returncode == 0
    client, _ = _client(tmp_path)
    victim = next(r for r in _runs(tmp_path, "FINISHED") if r.data.tags.get(ROLE_TAG) == "cell")
    # what a SIGKILL leaves: the cell's run still RUNNING, no FINISHED run for the cell
    client.update_run(victim.info.run_id, status="RUNNING")
    p = cli(tmp_path, *GRID)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    assert "3 already FINISHED in the store (skipped), 1 to run" in p.stdout + p.stderr
    stale = client.get_run(victim.info.run_id)
    assert stale.info.status == "FAILED" and ERROR_TAG in stale.data.tags
    cells = [r for r in _runs(tmp_path, "FINISHED") if r.data.tags.get(ROLE_TAG) == "cell"]
    assert len(cells) == 4 and len({r.data.tags[CELL_TAG] for r in cells}) == 4


def test_failing_cell_is_recorded_and_the_others_run(tmp_path):
    p = cli(tmp_path, "-m", "data.n_eval=50,100000", "train.epochs=3", "attribution=none")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "1 of 2 cells failed" in out and "data.n_eval=100000" in out
    runs = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "cell"]
    status = {r.data.params.get("data.n_eval", r.data.tags.get("hydra.overrides")): r.info.status
              for r in runs}
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"], status
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "n_eval" in failed.data.tags[ERROR_TAG]
    parent = next(r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "sweep")
    assert parent.info.status == "FAILED"


def test_single_run_has_no_parent(tmp_path):
    p = cli(tmp_path, "train.epochs=3", "attribution=none")
    assert p.returncode == 0
    (run,) = _runs(tmp_path)
    assert "mlflow.parentRunId" not in run.data.tags


def test_cell_id_ignores_paths_and_tracking_but_not_results():
    base = cell_id(compose(["epsilon=8/255"]))
    assert base == cell_id(compose([f"epsilon={8 / 255}"]))
    assert base == cell_id(compose(["epsilon=8/255", "paths.output_dir=/elsewhere",
                                    "tracking.experiment=other", "tracking.resume=false"]))
    assert base != cell_id(compose(["epsilon=8/255", "sparsity=0.25"]))
    assert base != cell_id(compose(["epsilon=8/255", "attack=pgd"]))


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)
    assert all(x != x for x in wilson(0, 0))


def test_resume_false_reruns_cells(tmp_path):
    grid = ["-m", "sparsity=0,0.5", "train.epochs=3", "attribution=none"]
    assert cli(tmp_path, *grid).returncode == 0
    p = cli(tmp_path, *grid, "tracking.resume=false")
    assert p.returncode == 0 and "0 already FINISHED" in p.stdout + p.stderr
    assert len([r for r in _runs(tmp_path, "FINISHED") if r.data.tags.get(ROLE_TAG) == "cell"]) == 4
    shutil.rmtree(tmp_path / "outputs")


def test_sigkill_mid_sweep_then_relaunch_completes_exactly_once(tmp_path):
    """Kill -9 a 12-cell sweep while its 4th cell computes, relaunch: only unfinished cells run.

    The cells are FGSM (tests.faults' ``fault`` attack), except that in the first launch every job from
    number 3 on hangs (``ROBUSTSWEEP_TEST_FAULT_FROM_JOB``), so the kill lands mid-cell after exactly 3
    finished cells, and the relaunch (without the fault) takes seconds, not a PGD-300 per cell."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "robustsweep", "-m", "sparsity=0,0.25,0.5,0.75", "epsilon=0.05,0.1,0.2",
            "train.epochs=5", "attribution=none", "attack=fgsm", "attack.name=fault",
            "+hydra.callbacks.faults._target_=tests.faults.Faults"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)  # the job process imports tests.faults
    first = {**env, "ROBUSTSWEEP_TEST_FAULT": "hang", "ROBUSTSWEEP_TEST_FAULT_FROM_JOB": "3"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=first, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Watch Hydra's job folders, not the store: a second process opening a brand-new SQLite
        # store while the sweep migrates it races on MLflow's schema migration.
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("outputs/multiruns/*/*/3")):
            time.sleep(0.2)
        time.sleep(1.0)  # job 3 hangs in its attack; jobs 0-2 are FINISHED
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "cell"]
    n_done = sum(r.info.status == "FINISHED" for r in killed)
    assert n_done == 3
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{n_done} already FINISHED in the store (skipped), {12 - n_done} to run" in p.stdout + p.stderr
    cells = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "cell"]
    finished = [r for r in cells if r.info.status == "FINISHED"]
    assert len(finished) == 12 and len({r.data.tags[CELL_TAG] for r in finished}) == 12
    assert all(r.info.status in ("FINISHED", "FAILED") for r in cells)  # nothing left RUNNING
    parents = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_heatmap_hatches_and_names_collapsed_cells():
    from matplotlib.patches import Rectangle

    from robustsweep.summary import curves, heatmap

    def cell(s, e, suspect=""):
        return {"attack.name": "fgsm", "prune.method": "l1", "sparsity": s, "epsilon": e,
                "asr": 0.5, "robust_acc": 0.4, "clean_acc": 0.9, "n_correct": 90, "n_eval": 100,
                "n_fooled": 45, "n_pred_classes": 10, "suspect": suspect}

    cells = [cell(0.0, 0.1), cell(0.75, 0.1, "collapsed,pgd_below_noise")]
    fig = heatmap(cells, "asr")
    hatched = [p for p in fig.axes[0].patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_xy() == (-0.5, 0.5)  # row 1 = sparsity 0.75
    assert any("collapsed" in t.get_text() for t in fig.axes[0].texts)
    fig = curves(cells)
    assert "collapsed model" in fig.axes[1].get_legend_handles_labels()[1]
