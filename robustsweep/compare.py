"""Comparisons people run by hand: ``python -m robustsweep.compare {cells,paired} ...``.

    python -m robustsweep.compare cells before/cells.csv after/cells.csv
    python -m robustsweep.compare paired RUN_ID_A RUN_ID_B [--tracking-uri sqlite:///outputs/mlflow.db]

``cells``: are two sweeps' numbers the same? Two ``cells.csv`` files (a sweep summary's) compared cell
by cell. Cells are matched by their key params (model, data, prune method, attack, sparsity, epsilon,
seed); every metric column both files' runs logged is compared as written (the CSV holds Python's
repr of each float, so equal text is bit-identical), except timings and memory (``*_s``, ``*_mb``,
``latency_*``, ``load_per_core``), which vary by nature. One line per metric; exit 1 if any cell or
value differs.

``paired``: is cell B really different from cell A? Both cells must have been evaluated on the same
images (same data and data.n_eval): their ``outcomes.csv`` artifacts (one row per image) are compared
image by image: the clean and robust accuracy differences (B - A) with 95 % paired-bootstrap intervals
and exact McNemar p-values, and the ASR difference on the images both classify correctly. Two
sparsities whose ASRs differ by a point on 500 images are usually *not* distinguishable; this says
which are.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

log = logging.getLogger("robustsweep.compare")
KEY = ("model.name", "data.name", "prune.method", "attack.name", "sparsity", "epsilon", "seed")
NOT_NUMBERS = ("run_id", "cell_id", "suspect")


def load(path: Path) -> tuple[dict[tuple[str, ...], dict[str, str]], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    # run_id, cell_id, suspect, the metrics, then the params (sorted; the first ones are dotted)
    first_param = next(i for i, k in enumerate(header) if "." in k)
    metrics = header[len(NOT_NUMBERS):first_param]
    return {tuple(r[k] for k in KEY): r for r in rows}, metrics


def cells(args: argparse.Namespace) -> int:
    a, ma = load(args.a)
    b, mb = load(args.b)
    ok = set(a) == set(b)
    if not ok:
        log.info("cells differ: only in %s: %s; only in %s: %s", args.a, sorted(set(a) - set(b)),
                 args.b, sorted(set(b) - set(a)))
    def measured(rows: dict, m: str) -> bool:  # a column the file's runs logged (nan = never logged)
        return any(r[m] not in ("", "nan") for r in rows.values())

    shared = [m for m in ma if m in mb and measured(a, m) and measured(b, m) and not m.endswith(("_s", "_mb"))
              and not m.startswith(("latency_", "load_per_core"))]
    for m in shared:
        diff = [k for k in sorted(set(a) & set(b)) if a[k][m] != b[k][m]]
        ok &= not diff
        log.info("%-22s %s", m, f"identical in all {len(set(a) & set(b))} cells" if not diff else
                 f"DIFFERS in {len(diff)} cells, e.g. {diff[0]}: {a[diff[0]][m]} vs {b[diff[0]][m]}")
    changed = [f"{k}: {a[k]['suspect']!r} -> {b[k]['suspect']!r}" for k in sorted(set(a) & set(b))
               if a[k]["suspect"] != b[k]["suspect"]]
    log.info("suspect tags: %s", "; ".join(changed) or "identical")
    log.info("logged only in %s: %s", args.b,
             ", ".join(m for m in mb if measured(b, m) and (m not in ma or not measured(a, m))) or "none")
    log.info("RESULT: %s", "bit-identical metrics" if ok else "DIFFERENT")
    return 0 if ok else 1



def paired(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from robustsweep.tracking.outcomes import compare, run_outcomes

    client = MlflowClient(args.tracking_uri)
    names = {r: client.get_run(r).info.run_name for r in (args.a, args.b)}
    out = compare(run_outcomes(client, args.a), run_outcomes(client, args.b), n_boot=args.n_boot)
    log.info("A = %s\nB = %s\n%d images, B - A:", names[args.a], names[args.b], out["n_images"])
    for key in ("clean_acc", "robust_acc"):
        log.info("  %-11s %+.4f  95 %% CI [%+.4f, %+.4f]  McNemar p = %.3g", key, out[f"delta_{key}"],
                 out[f"delta_{key}_lo"], out[f"delta_{key}_hi"], out[f"delta_{key}_mcnemar_p"])
    if out["n_common"]:
        log.info("  asr         %+.4f  95 %% CI [%+.4f, %+.4f]  McNemar p = %.3g  (on the %d images both "
                 "classify correctly)", out["delta_asr_common"], out["delta_asr_common_lo"],
                 out["delta_asr_common_hi"], out["delta_asr_common_mcnemar_p"], out["n_common"])
    return 0



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustsweep.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cells", help="two sweeps' cells.csv, cell by cell: bit-identical or not")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.set_defaults(fn=cells)
    p = sub.add_parser("paired", help="two cells on the same images: paired differences with intervals")
    p.add_argument("a", help="MLflow run id of cell A")
    p.add_argument("b", help="MLflow run id of cell B")
    p.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    p.add_argument("--n-boot", type=int, default=2000)
    p.set_defaults(fn=paired)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
