"""Compare a cliff search with a dense grid on the same experiment (both in one MLflow store).

    python -m robustsweep -m experiment=quickstart "sparsity=range(0,1,0.05)"   # 20-point grid
    python -m robustsweep -m experiment=quickstart search=cliff                  # the study
    python scripts/bench/cliff_vs_grid.py --store sqlite:///outputs/mlflow.db --out docs/cliff_vs_grid.png

The grid's bracket uses the same definition as the study (robustsweep.search.bracket), with the
grid's own sparsity-0 cell as the reference. Prints both brackets and the number of jobs each
needed; exits 1 if the study's bracket does not lie inside the grid's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from robustsweep.search import Criterion, bracket
from robustsweep.tracking.store import exact_metrics
from robustsweep.tracking.sweep import ROLE_TAG, finished_children

log = logging.getLogger("cliff_vs_grid")


def children(client: MlflowClient, exp: str, role: str) -> tuple[str, list]:
    """The latest parent of ``role`` and its FINISHED children as (sparsity, metrics) rows."""
    parents = client.search_runs([exp], f"tags.`{ROLE_TAG}` = '{role}'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise SystemExit(f"no {role} parent run in the store")
    pid = parents[0].info.run_id
    runs = finished_children(client, pid, exp)
    rows = sorted(((float(r.data.params["sparsity"]), exact_metrics(r)) for r in runs), key=lambda x: x[0])
    return pid, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="robustsweep")
    ap.add_argument("--delta", type=float, default=0.10)
    ap.add_argument("--delta-acc", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("outputs/cliff_vs_grid.png"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    client = MlflowClient(a.store)
    exp = client.get_experiment_by_name(a.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {a.experiment!r} in {a.store}")
    crit = Criterion("asr", a.delta, a.delta_acc)
    _, grid = children(client, exp.experiment_id, "sweep")
    _, trials = children(client, exp.experiment_id, "study")
    ref_g = dict(next(m for s, m in grid if s == 0.0))
    ref_t = dict(next(m for s, m in trials if s == 0.0))
    bg = bracket([(s, crit.constraints(m, ref_g)) for s, m in grid])
    bt = bracket([(s, crit.constraints(m, ref_t)) for s, m in trials])
    log.info("grid : %2d jobs, cliff in [%.4f, %.4f] (width %.4f)", len(grid), bg.low, bg.high, bg.width)
    log.info("study: %2d jobs, cliff in [%.4f, %.4f] (width %.4f)", len(trials), bt.low, bt.high, bt.width)
    inside = bg.low <= bt.low and bt.high <= bg.high
    log.info("study bracket inside the grid's: %s; jobs %d vs %d (%.0f %%)", inside, len(trials),
             len(grid), 100 * len(trials) / len(grid))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, metric, thr in ((axes[0], "asr", ref_g["asr"] + a.delta),
                            (axes[1], "clean_acc", ref_g["clean_acc"] - a.delta_acc)):
        ax.axvspan(bg.low, bg.high, color="0.6", alpha=0.25, lw=0, label="grid bracket")
        ax.axvspan(bt.low, bt.high, color="tab:orange", alpha=0.45, lw=0, label="study bracket")
        ax.plot([s for s, _ in grid], [m[metric] for _, m in grid], "o-", color="0.45", ms=4,
                label=f"grid ({len(grid)} jobs)")
        ax.plot([s for s, _ in trials], [m[metric] for _, m in trials], "D", color="tab:orange", ms=5,
                label=f"bisection ({len(trials)} trials)")
        ax.axhline(thr, color="crimson", ls="--", lw=1, label="safe limit")
        ax.set_xlabel("sparsity")
        ax.set_ylabel({"asr": "attack success rate", "clean_acc": "clean accuracy"}[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"cliff: grid [{bg.low:.3f}, {bg.high:.3f}] with {len(grid)} jobs vs bisection "
                 f"[{bt.low:.4f}, {bt.high:.4f}] with {len(trials)} trials", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    log.info("figure: %s", a.out)
    return 0 if inside else 1


if __name__ == "__main__":
    sys.exit(main())
