"""Issue 29: the study page the report writes from a store -- replicates pooled, verdicts from
intervals, provenance, and what is missing named while the rest is still written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from robustsweep.tracking.store import exact_metrics
from robustsweep.writeup import verdict
from tests import forked_cli
from tests.test_cli import cli


def test_verdicts_follow_the_interval_not_the_point():
    assert verdict("ASR", 0.308, 0.272, 0.344) == "ASR rises by 30.8 points [+27.2, +34.4]"
    assert verdict("clean accuracy", -0.059, -0.090, -0.028).startswith("clean accuracy falls by 5.9 points")
    # "beats the dense baseline: +1.9 [-2.1, +5.9]" is not a verdict the page may write
    said = verdict("robust accuracy", 0.019, -0.021, 0.059)
    assert said.startswith("no change in robust accuracy larger than 5.9 points is detectable")
    assert "not measurable" in verdict("ASR", float("nan"), float("nan"), float("nan"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    p = cli(root, "-m", "sparsity=0,0.75", "seed=0,1", "train.epochs=5", "attribution=none",
            "tracking.experiment=study")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return root


def _report(root: Path, *args: str) -> subprocess.CompletedProcess:
    return forked_cli.run(["--tracking-uri", f"sqlite:///{root}/outputs/mlflow.db", *args], root,
                          module="robustsweep.report", timeout=300)


@pytest.mark.slow
def test_the_page_pools_replicates_and_states_its_provenance(store, tmp_path):
    p = _report(store, "--experiment", "study", "--out", str(tmp_path / "page"), "--note", "digits, as bundled",
                "--against", "dense", "--claim", "fgsm 0.1 | 0.75 | delta_clean_acc | -100 | 100",
                "--claim", "fgsm 0.1 | 0.75 | delta_clean_acc | 200 | 300")
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "page" / "README.md").read_text()
    claims = page.split("## Claims")[1].split("##")[0]
    assert "l1_unstructured 0.75 (2 seeds), change in clean accuracy: **consistent**" in claims
    assert "**refuted**" in claims
    # the dense row as the baseline of a comparison gives the same differences as the reference columns
    main, vs = page.split("## Against dense")
    row = next(line for line in main.splitlines() if line.startswith("| l1_unstructured 0.75"))
    row_vs = next(line for line in vs.splitlines() if line.startswith("| l1_unstructured 0.75"))
    assert row.split(" | ")[-3:] == row_vs.split(" | ")[-3:]
    assert "python -m robustsweep.report --tracking-uri" in page  # the command that made it
    rows = [line for line in main.splitlines() if line.startswith("| l1_unstructured 0.75")]
    assert len(rows) == 1 and "| 2 |" in rows[0]  # the two seeds are one condition
    assert "(2 seeds):" in page and ("rises by" in page or "falls by" in page or "no change" in page)
    for fragment in ("git commit", "torch 2.", "cores", "fingerprint", "seeds: 0, 1", "test split: seed 0: 0.",
                     "note: digits, as bundled"):
        assert fragment in page
    assert (tmp_path / "page" / "cells.csv").exists() and (tmp_path / "page" / "curves.png").exists()
    import csv

    with open(tmp_path / "page" / "conditions.csv") as f:
        conds = {r["condition"]: r for r in csv.DictReader(f)}
    assert conds["l1_unstructured 0.75"]["n_seeds"] == "2" and conds["l1_unstructured 0.75"]["seeds"] == "0 1"
    assert float(conds["dense"]["delta_clean_acc"]) == 0.0


@pytest.mark.slow
def test_a_cell_without_paired_outcomes_is_named_and_the_rest_written(store, tmp_path):
    """An older cell (no paired differences: logged before the evaluator) in the same experiment."""
    client = MlflowClient(f"sqlite:///{store}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("study").experiment_id
    donor = next(r for r in client.search_runs([exp], "tags.`robustsweep.role` = 'cell'")
                 if r.data.params["sparsity"] == "0.75")
    old = client.create_run(exp, tags={"robustsweep.role": "cell", "robustsweep.cell_id": "old0"})
    for k, v in donor.data.params.items():
        client.log_param(old.info.run_id, k, "0.5" if k == "sparsity" else v)
    for k in ("clean_acc", "robust_acc", "asr", "n_eval", "n_correct"):
        client.log_metric(old.info.run_id, k, exact_metrics(donor)[k])
    client.set_terminated(old.info.run_id, "FINISHED")
    p = _report(store, "--experiment", "study", "--out", str(tmp_path / "page"))
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "page" / "README.md").read_text()
    assert "## What is missing" in page and old.info.run_id in page and "no outcomes.csv" in page
    assert "| l1_unstructured 0.75" in page  # the rest is still there
    client.delete_run(old.info.run_id)


@pytest.mark.slow
def test_an_unknown_experiment_exits_2_naming_it(store, tmp_path):
    p = _report(store, "--experiment", "nope", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "nope" in p.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_an_older_cell_is_compared_with_its_reference_in_the_store(store, tmp_path):
    """A cell logged before the paired evaluator (its outcomes.csv without the reference's columns,
    no delta metrics): the report pairs it with the uncompressed cell of the same model, seed, attack
    and images in the experiment, and gets the difference the evaluator would have logged."""
    import csv

    client = MlflowClient(f"sqlite:///{store}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("study").experiment_id
    donor = next(r for r in client.search_runs([exp], "tags.`robustsweep.role` = 'cell'")
                 if r.data.params["sparsity"] == "0.75" and r.data.params["seed"] == "0")
    with open(client.download_artifacts(donor.info.run_id, "outcomes.csv", str(tmp_path))) as f:
        rows = list(csv.DictReader(f))
    stripped = tmp_path / "old" / "outcomes.csv"
    stripped.parent.mkdir()
    with open(stripped, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "label", "clean_pred", "adv_pred", "broken_by"])
        w.writeheader()
        w.writerows({k: r[k] for k in w.fieldnames} for r in rows)
    old = client.create_run(exp, tags={"robustsweep.role": "cell", "robustsweep.cell_id": "old1"})
    for k, v in donor.data.params.items():
        client.log_param(old.info.run_id, k, "0.6" if k == "sparsity" else v)  # a condition of its own
    for k in ("clean_acc", "robust_acc", "asr", "n_eval", "n_correct"):
        client.log_metric(old.info.run_id, k, exact_metrics(donor)[k])
    client.log_artifact(old.info.run_id, str(stripped))
    client.set_terminated(old.info.run_id, "FINISHED")
    try:
        p = _report(store, "--experiment", "study", "--out", str(tmp_path / "page"))
        assert p.returncode == 0, p.stderr
        page = (tmp_path / "page" / "README.md").read_text()
        (row,) = [line for line in page.splitlines() if line.startswith("| l1_unstructured 0.60")]
        d = exact_metrics(donor)["delta_clean_acc"] * 100
        assert f"| {d:+.1f} [" in row  # the same point difference as the evaluator logged for its donor
        assert "computed by the report against stored reference" in page
    finally:
        client.delete_run(old.info.run_id)


def test_a_claim_is_judged_by_its_interval_only():
    from robustsweep.writeup import Claim

    c = Claim.parse("fgsm 8/255 | 0.75 | delta_asr_common | 30 | 45")
    assert (c.attack, c.rows, c.metric, c.low, c.high) == ("fgsm 8/255", "0.75", "delta_asr_common", 30, 45)
    assert c.judge(0.38, 0.32, 0.44).startswith("**consistent**")
    assert c.judge(0.10, 0.05, 0.15).startswith("**refuted**")
    assert c.judge(0.40, 0.20, 0.50).startswith("**inconclusive**")  # the point inside is not enough
    assert c.judge(0.28, 0.26, 0.31).startswith("**inconclusive**")
    for bad in ("fgsm 8/255 | 0.75 | asr | 30 | 45", "fgsm | 0.75 | delta_asr_common | 30",
                "fgsm 8/255 | 0.75 | delta_clean_acc | -3 | -8"):
        with pytest.raises(ValueError, match="allowed: 'ATTACK EPS"):
            Claim.parse(bad)


def test_dense_cells_of_two_prune_methods_are_one_condition_and_a_saturated_reference_is_named():
    from robustsweep.writeup import Condition, _saturated, condition_of

    base = {"sparsity": "0.0", "attack.name": "pgd", "seed": "0"}
    assert condition_of({**base, "prune.method": "global_l1"}) == condition_of({**base, "prune.method": "l1"})
    assert condition_of({**base, "sparsity": "0.5", "prune.method": "global_l1"}) != condition_of(
        {**base, "sparsity": "0.5", "prune.method": "l1"})
    cond = Condition([{"all_metrics": {"ref_asr": 1.0}}, {"all_metrics": {"ref_asr": 1.0}}])
    assert "saturated" in _saturated(cond, "delta_asr_common", "ASR")
    assert _saturated(cond, "delta_clean_acc", "clean accuracy") is None  # clean accuracy can still move
    cond.cells[1]["all_metrics"]["ref_asr"] = 0.98  # one seed's dense model leaves an image robust
    assert _saturated(cond, "delta_asr_common", "ASR") is None
