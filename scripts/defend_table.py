"""The README's defence tables: each training objective, before and after compression and repair.

    python scripts/defend_table.py --experiment defend_cifar [--tracking-uri sqlite:///outputs/mlflow.db]
        [--baselines outputs/cache/baselines] [--figure docs/defend_tradeoff.png]

Reads the experiment's FINISHED cell runs (the newest per cell id) and prints one Markdown row per
(baseline objective, fine-tune after compression, sparsity): clean accuracy, then the robust
accuracy and ASR of every attack@eps in the experiment, and the `suspect` tags. ``--baselines``
adds a table of the cached baselines of the objectives seen (test accuracy on the whole test
split, epochs, training time and the median epoch time: training runs that shared the machine
took longer than the median idle epoch says). ``--figure`` draws summary.tradeoff over every cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from robustsweep.core.params import eps_label
from robustsweep.summary import KEY_PARAMS, defence_label, tradeoff
from robustsweep.tracking.sweep import newest_cell_runs

log = logging.getLogger("defend_table")


def _f(v: float, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def cell(r: Any) -> dict[str, Any]:
    """A run as summary.tradeoff reads it."""
    c: dict[str, Any] = {k: r.data.params.get(k, "") for k in KEY_PARAMS}
    c["sparsity"], c["epsilon"] = float(c["sparsity"] or 0), float(c["epsilon"])
    c.update(r.data.metrics, suspect=r.data.tags.get("suspect", ""))
    c["attack"] = c["attack.name"] + (" L2" if c.get("attack.norm") == "l2" else "")
    return c


def table(cells: list[dict[str, Any]]) -> str:
    rows: dict[tuple[str, float], dict[str, Any]] = defaultdict(lambda: {"m": {}, "suspect": set()})
    for c in cells:
        row = rows[(defence_label(c), c["sparsity"])]
        row.setdefault("clean", c["clean_acc"])
        label = f"{c['attack']} {eps_label(c['epsilon'], c.get('attack.norm') or 'linf')}"
        row["m"].setdefault(label, (c["robust_acc"], c["asr"]))
        row["suspect"] |= set(filter(None, c["suspect"].split(",")))
    attacks = sorted({a for r in rows.values() for a in r["m"]})
    head = ["baseline (+ fine-tune)", "sparsity", "clean", *[f"robust {a}" for a in attacks],
            *[f"ASR {a}" for a in attacks], "suspect"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, sparsity), r in sorted(rows.items()):
        m = r["m"]
        lines.append("| " + " | ".join([label, f"{sparsity:.2f}", _f(r["clean"]),
                                         *[_f(m.get(a, (math.nan,))[0]) for a in attacks],
                                         *[_f(m.get(a, (math.nan, math.nan))[1]) for a in attacks],
                                         ", ".join(sorted(r["suspect"])) or "–"]) + " |")
    return "\n".join(lines)


def baselines(folder: Path, model: str) -> str:
    """The cached baselines of ``model``: objective, test accuracy, epochs, training time."""
    lines = ["| objective | test acc (10k) | epochs | train s | median epoch s |", "|---|---|---|---|---|"]
    for meta_path in sorted(folder.glob(f"{model}-*.json")):
        meta = json.loads(meta_path.read_text())
        objective = meta.get("config", {}).get("objective") or {"name": "clean"}
        params = ", ".join(f"{k}={v}" for k, v in objective.items() if k != "name")
        hist = meta.get("history", [])
        name = objective["name"] + (f" ({params})" if params else "")
        median = statistics.median(h["epoch_s"] for h in hist) if hist else math.nan
        lines.append(f"| {name} | {_f(meta['test_acc'], '.4f')} | {len(hist)} | "
                     f"{_f(meta.get('train_s', math.nan), '.0f')} | {_f(median, '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="defend_cifar")
    ap.add_argument("--baselines", default="", help="the baseline cache folder (outputs/cache/baselines)")
    ap.add_argument("--model", default="resnet_small", help="which cached baselines to list")
    ap.add_argument("--figure", default="", help="also write the trade-off figure of every cell here (PNG)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = newest_cell_runs(MlflowClient(args.tracking_uri), args.experiment)
    if runs is None:
        log.error("no experiment %r in %s", args.experiment, args.tracking_uri)
        return 2
    cells = [cell(r) for r in runs if "attack.name" in r.data.params]
    sys.stdout.write(table(cells) + "\n")
    if args.baselines:
        sys.stdout.write("\n" + baselines(Path(args.baselines), args.model) + "\n")
    if args.figure:
        import matplotlib.pyplot as plt

        fig = tradeoff(cells)
        fig.savefig(args.figure, dpi=110)
        plt.close(fig)
        log.info("wrote %s (%d cells)", args.figure, len(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
