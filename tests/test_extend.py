"""Growing the tool without losing what users have: an old store resumes, a network and an attack
the package does not know run end to end, and a collapsed model is named as such."""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from robustsweep.config import compose
from robustsweep.pipeline import run
from tests import forked_cli
from tests.conftest import FAST, isolated_overrides
from tests.forked_cli import run_many

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# A store written by the code before the seams (commit c37dc28) with the quickstart grid:
#   python -m robustsweep -m experiment=quickstart sparsity=0,0.25,0.5,0.75 epsilon=0.05,0.1,0.2
# (its artifacts were not kept: 61 KB instead of ~3 MB; its paths pointed at /tmp/before_out/qs).
FIXTURE = REPO / "tests" / "fixtures" / "quickstart_store_c37dc28.db.gz"
FIXTURE_ROOT = "/tmp/before_out/qs"
QUICKSTART_GRID = ["experiment=quickstart", "sparsity=0,0.25,0.5,0.75", "epsilon=0.05,0.1,0.2"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the repository, so that `tests.nets` imports as a user's own package would.
    # In a process forked after the imports (tests/forked_cli.py), as a new interpreter would run it.
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO)}
    return forked_cli.run(list(args), tmp_path, env, timeout=900)


# A store written by the code before the reference AutoAttack, BN recalibration and gradual pruning
# (commit 898906d; 2 cells, AutoAttack at torchattacks' 10 iterations):
#   python -m robustsweep -m experiment=quickstart attack=autoattack sparsity=0,0.5 epsilon=0.1 \
#       data.n_eval=40 attribution=none
# Its cells are attack=autoattack_fast now; the prune node has gained schedule/steps, the config a
# compress node: at their neutral values none of that is part of a cell's identity.
FIXTURE_AA = REPO / "tests" / "fixtures" / "autoattack_store_898906d.db.gz"
FIXTURE_AA_ROOT = "/tmp/before_out/aa/outputs"


def _restore(fixture: Path, root: str, out: Path) -> Path:
    out.mkdir()
    db = out / "mlflow.db"
    with gzip.open(fixture) as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with sqlite3.connect(db) as con:  # the store moved here: point its artifact roots here too
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                    (root, str(out)))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (root, str(out)))
    return db


def test_a_store_from_before_the_reference_autoattack_resumes_as_autoattack_fast(tmp_path):
    db = _restore(FIXTURE_AA, FIXTURE_AA_ROOT, tmp_path / "outputs")
    p = cli(tmp_path, "-m", "experiment=quickstart", "attack=autoattack_fast", "sparsity=0,0.5", "epsilon=0.1",
            "data.n_eval=40", "attribution=none")
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "sweep of 2 cells: 2 already FINISHED in the store (skipped), 0 to run" in log, log[-3000:]
    assert not (tmp_path / "outputs" / "cache").exists()  # nothing computed
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("robustsweep")
    assert len(client.search_runs([exp.experiment_id], "tags.`robustsweep.role` = 'cell'")) == 2


def test_a_store_from_before_the_seams_resumes_with_zero_cells_run(tmp_path):
    out = tmp_path / "outputs"
    db = _restore(FIXTURE, FIXTURE_ROOT, out)
    p = cli(tmp_path, "-m", *QUICKSTART_GRID)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "sweep of 12 cells: 12 already FINISHED in the store (skipped), 0 to run" in log
    assert "training baseline" not in log and not (out / "cache").exists()  # nothing computed
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("robustsweep")
    cells = client.search_runs([exp.experiment_id], "tags.`robustsweep.role` = 'cell'")
    assert len(cells) == 12  # no cell run twice


def test_own_network_by_target_and_a_torchattacks_attack_by_yaml_run_end_to_end(tmp_path):
    own = ["model=custom", "model._target_=tests.nets.tiny_mlp", "+model.hidden=24", "sparsity=0,0.5",
           "epsilon=0.1", *FAST]
    for attack in (["attack=mifgsm", "attack.alpha=0.02"], ["attack=fgsm"]):
        p = cli(tmp_path, "-m", *own, *attack)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("robustsweep")
    runs = client.search_runs([exp.experiment_id], "tags.`robustsweep.role` = 'cell'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    by = {(r.data.params["attack.name"], r.data.params["sparsity"]): r for r in runs}
    for r in runs:
        m = r.data.metrics
        assert m["clean_acc"] > 0.5 and 0 <= m["asr"] <= 1 and m["guard_n_batches"] >= 1
        assert r.data.params["model._target_"] == "tests.nets.tiny_mlp"
        assert r.data.params["model.hidden"] == "24"
        assert "sanity_asr_unbounded" in m  # the same checks as a built-in model
    # MI-FGSM (10 momentum steps of 0.02, from the command line) is at least as strong as FGSM on
    # the same model and images
    for s in ("0.0", "0.5"):
        assert by[("mifgsm", s)].data.metrics["asr"] >= by[("fgsm", s)].data.metrics["asr"] - 0.02
    assert by[("mifgsm", "0.5")].data.metrics["sparsity_measured"] == pytest.approx(0.5, abs=0.01)


BAD_TARGETS = [
    ("tests.nets.no_such_net", "model._target_='tests.nets.no_such_net' is not importable"),
    ("no_such_pkg.nets.net", "model._target_='no_such_pkg.nets.net' is not importable"),
    ("tests.nets.NOT_CALLABLE", "is a int, not callable"),
    ("tests.nets.not_a_network", "returned a str, not a torch.nn.Module"),
]


@pytest.fixture(scope="module")
def bad_target_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Real commands, each in its own process forked after the imports (tests/forked_cli.py)."""
    dirs = [tmp_path_factory.mktemp("bad-target") for _ in BAD_TARGETS]
    runs = run_many([{"args": ["-m", "model=custom", f"model._target_={t}", "sparsity=0,0.5"], "cwd": d,
                      "env": {"PYTHONPATH": str(REPO)}} for (t, _), d in zip(BAD_TARGETS, dirs, strict=True)])
    return {t: (d, p) for (t, _), d, p in zip(BAD_TARGETS, dirs, runs, strict=True)}


@pytest.mark.parametrize(("target", "fragment"), BAD_TARGETS)
def test_a_bad_target_is_a_clear_error_before_anything_runs(bad_target_runs, target, fragment):
    tmp_path, p = bad_target_runs[target]
    assert p.returncode != 0
    assert fragment in p.stderr + p.stdout, (p.stdout + p.stderr)[-2000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing started


def test_the_collapsed_quickstart_cell_is_tagged_and_still_logged(tmp_path):
    # The report: quickstart at sparsity 0.75 predicts 2 of 10 digits at 11.7 % clean
    # accuracy, and its tiny ASR read as "very robust".
    cfg = compose([*isolated_overrides(tmp_path), "experiment=quickstart", "sparsity=0.75",
                   "epsilon=0.05", "attribution=none"])
    m = run(cfg)
    assert m["collapsed"] == 1.0 and m["n_pred_classes"] < 5 and m["clean_acc"] < 0.15
    assert 0 <= m["asr"] <= 1  # still logged
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (r,) = client.search_runs([client.get_experiment_by_name("robustsweep").experiment_id])
    assert "collapsed" in r.data.tags["suspect"].split(",")
    healthy = run(compose([*isolated_overrides(tmp_path), "experiment=quickstart", "sparsity=0.25",
                           "epsilon=0.05", "attribution=none"]))
    assert healthy["collapsed"] == 0.0


def test_own_pruning_rule_and_dataset_by_target(tmp_path):
    m = run(compose([*isolated_overrides(tmp_path), *FAST, "attribution=none", "sparsity=0.5",
                     "+prune._target_=tests.nets.prune_first_half_rows",
                     "+data._target_=tests.nets.small_digits"]))
    assert m["n_eval"] == 120  # the loader's 120 test images
    # the rule zeroes whole output rows: half the rows of each of the 3 pruned tensors
    assert m["sparsity_measured"] == pytest.approx(0.5, abs=0.05)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (r,) = client.search_runs([client.get_experiment_by_name("robustsweep").experiment_id])
    assert r.data.params["prune._target_"] == "tests.nets.prune_first_half_rows"
    name = r.info.run_name
    assert name.startswith("s0.50 ") and "prune_first_half_rows" in name  # named after the rule
