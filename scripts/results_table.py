"""Print a Markdown table of one sweep's runs from the MLflow store (what the README table is).

    python scripts/results_table.py                       # the newest sweep in outputs/mlflow.db
    python scripts/results_table.py --sweep-dir outputs/multiruns/2026-11-21/10-00-00
    python scripts/results_table.py --tracking-uri sqlite:///elsewhere.db --experiment robustsweep

Rows are sorted by attack, eps, sparsity. ASR is shown with its denominator (n_correct).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow.tracking import MlflowClient

log = logging.getLogger("results_table")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="robustsweep")
    ap.add_argument("--sweep-dir", default=None, help="tag hydra.sweep.dir; default: the newest sweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        log.error("no experiment %r in %s", args.experiment, args.tracking_uri)
        return 2
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000,
                              order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if "hydra.sweep.dir" in r.data.tags]
    if not runs:
        log.error("no finished sweep runs in experiment %r", args.experiment)
        return 2
    sweep = args.sweep_dir or runs[0].data.tags["hydra.sweep.dir"]
    runs = [r for r in runs if r.data.tags["hydra.sweep.dir"].rstrip("/").endswith(sweep.rstrip("/"))]
    if not runs:
        log.error("no runs with hydra.sweep.dir=%s", sweep)
        return 2

    def key(r):
        p = r.data.params
        return (p["attack.name"], float(p["epsilon"]), float(p["sparsity"]))

    m = lambda r, k: r.data.metrics.get(k, float("nan"))  # noqa: E731
    p0 = runs[0].data.params
    print(f"sweep {sweep}: {p0['model.name']} on {p0['data.name']}, {p0['prune.method']}, "
          f"{int(m(runs[0], 'n_eval'))} eval images\n")
    print("| attack | eps | sparsity (measured) | clean_acc | robust_acc | asr (of n_correct) |")
    print("|---|---|---|---|---|---|")
    for r in sorted(runs, key=key):
        attack, eps, sparsity = key(r)
        print(f"| {attack} | {eps * 255:.3g}/255 | {sparsity:.2f} ({m(r, 'sparsity_measured'):.3f}) | "
              f"{m(r, 'clean_acc'):.3f} | {m(r, 'robust_acc'):.3f} | "
              f"{m(r, 'asr'):.3f} ({int(m(r, 'n_correct'))}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
