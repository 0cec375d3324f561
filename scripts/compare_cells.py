"""Are two sweeps' numbers the same? Compare two ``cells.csv`` files (a sweep summary's) cell by cell.

    python scripts/compare_cells.py before/cells.csv after/cells.csv

Cells are matched by their key params (model, data, prune method, attack, sparsity, epsilon, seed);
every metric column both files' runs logged is compared as written (the CSV holds Python's repr of each
float, so equal text is bit-identical), except timings and memory (``*_s``, ``*_mb``, ``latency_*``,
``load_per_core``), which vary by nature. Prints one line per metric and exits 1 if any cell or value differs.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

log = logging.getLogger("compare_cells")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
