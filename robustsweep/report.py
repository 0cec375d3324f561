"""A study's results page and figures from the MLflow store alone: ``python -m robustsweep.report``.

    python -m robustsweep.report --experiment NAME --out docs/results/NAME   # every cell of NAME
    python -m robustsweep.report --parent-run-id 69de47...        # one sweep's cells
    python -m robustsweep.report --tracking-uri sqlite:///elsewhere.db --note "CIFAR-10 as JPEG q75"
    python -m robustsweep.report --log-to-parent                  # also attach it to the sweep's parent run
    python -m robustsweep.report --experiment NAME --against "l1_unstructured 0.90 + ft 2ep"  # rows vs one row

Writes ``README.md`` (tables of levels and of paired differences against the dense reference with
95 % intervals, pooled over seeds where cells differ only in ``seed``; one verdict per comparison
from its interval; cliff searches; a provenance card; robustsweep.writeup) and the files the
end-of-sweep callback logs (heatmaps, curves, attention drift, cells.csv) to ``--out`` (default
``outputs/reports/<experiment>/`` or ``<parent run id>/``). Read-only on the store unless
``--log-to-parent`` is given. Exit status 2, with a message, for an unknown experiment or parent
run, an experiment without finished cells, or a store that cannot be opened; cells without what a
comparison needs are named in the page's "What is missing" and the rest is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("robustsweep.report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustsweep.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI",
                                                             "sqlite:///outputs/mlflow.db"))
    ap.add_argument("--experiment", default="robustsweep")
    ap.add_argument("--parent-run-id", default=None, help="default: the newest sweep's parent run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--log-to-parent", action="store_true")
    ap.add_argument("--note", default="", help="a line for the page's provenance card (how the data was made)")
    ap.add_argument("--against", action="append", default=[], metavar="ROW",
                    help="also compare every row with this one (its label in the page's tables), paired")
    ap.add_argument("--claim", action="append", default=[], metavar="'ATTACK EPS | ROWS | DELTA | LOW | HIGH'",
                    help="judge a claimed range (points) of a difference against its interval, e.g. "
                         "'fgsm 8/255 | 0.75 | delta_asr_common | 30 | 45'")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from robustsweep.writeup import Claim

    try:
        claims = [Claim.parse(c) for c in args.claim]
    except ValueError as e:
        log.error("%s", e)  # before reading anything
        return 2

    from robustsweep.summary import SummaryError, experiment_cells, write_summary
    from robustsweep.tracking.sweep import ROLE_TAG
    from robustsweep.writeup import write_page

    uri = args.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        log.error("no MLflow store at %s (the file does not exist)", uri)  # never create one
        return 2
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            log.error("no experiment %r in %s; experiments there: %s", args.experiment, uri,
                      ", ".join(names) or "none")
            return 2
        cells = None
        if args.parent_run_id:
            try:
                parent = client.get_run(args.parent_run_id)
            except MlflowException:
                log.error("no run %r in %s", args.parent_run_id, uri)
                return 2
            if parent.data.tags.get(ROLE_TAG) != "sweep":
                log.error("run %s is not a sweep's parent run", args.parent_run_id)
                return 2
        else:
            cells = experiment_cells(client, exp.experiment_id)
            if not cells:
                log.error("experiment %r has no finished cells (run some with python -m robustsweep ...)",
                          args.experiment)
                return 2
            found = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
            parent = found[0] if found else None
        pid = parent.info.run_id if parent is not None else None
        out = args.out or Path("outputs") / "reports" / (pid if args.parent_run_id else args.experiment)
        cells = write_summary(client, pid or "", out, cells=cells)
        studies = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'study'", max_results=1000)
        page = write_page(client, exp.name, cells, out, studies=studies, note=args.note,
                          against_labels=args.against, claims=claims)
        log.info("results page: %s", page)
        if args.log_to_parent:
            if pid is None:
                log.error("--log-to-parent: experiment %r has no sweep parent run to attach to",
                          args.experiment)
                return 2
            client.log_artifacts(pid, str(out), "summary")
            names = sorted(p.name for p in out.iterdir())
            log.info("attached %d files to parent run %s as artifacts under summary/: %s", len(names), pid,
                     ", ".join(names))
    except SummaryError as e:
        log.error("%s", e)
        return 2
    except MlflowException as e:
        log.error("cannot read the MLflow store %s: %s", uri, e)
        return 2
    log.info("%s: %d cell%s -> %s", parent.info.run_name if args.parent_run_id else args.experiment, len(cells),
             "" if len(cells) == 1 else "s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
