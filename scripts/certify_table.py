"""The README's certification tables: certified (IBP, CROWN) and attacked robust accuracy per
sparsity, and randomized smoothing's certified accuracy per radius.

    python scripts/certify_table.py --experiment certify_digits [--tracking-uri sqlite:///outputs/mlflow.db]

Reads the experiment's FINISHED cell runs (the newest per cell id). Bound-propagation cells: one row
per (baseline objective, eps, sparsity) with clean accuracy, the attack's robust accuracy, each
method's certified accuracy and its seconds per 1000 images. Smoothing cells: one row per
(objective, sparsity) with certified accuracy at each radius, the average certified radius, the
abstain rate and seconds per 1000 images.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import defaultdict

from mlflow.tracking import MlflowClient

from robustsweep.tracking.sweep import newest_cell_runs

log = logging.getLogger("certify_table")


def _f(v: float, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="certify_digits")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = newest_cell_runs(MlflowClient(args.tracking_uri), args.experiment)
    if runs is None:
        log.error("no experiment %r in %s", args.experiment, args.tracking_uri)
        return 2
    bound: dict[tuple, dict] = defaultdict(dict)
    smooth = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        method = p.get("certify.name", "none")
        if method == "none" or "certified_acc" not in m:
            continue
        objective = p.get("objective.name", "clean")
        if method == "smoothing":
            smooth.append((objective, float(p["sparsity"]), p.get("certify.sigma"), p.get("certify.n"), m, p))
            continue
        if method == "crown":
            method = "crown" if p.get("certify.intermediate") == "crown" else "crown-ibp"
        row = bound[(objective, float(p["epsilon"]), float(p["sparsity"]))]
        row.setdefault("clean", m["clean_acc"])
        row.setdefault("robust", m["robust_acc"])
        row.setdefault("attack", p["attack.name"])
        row[method] = (m["certified_acc"], 1000 * m.get("certify_s", math.nan) / m["n_eval"])
    methods = sorted({k for r in bound.values() for k in r if k not in ("clean", "robust", "attack")})
    head = ["baseline", "eps", "sparsity", "clean", "robust (attack)", *[f"certified {k}" for k in methods],
            *[f"s/1000 img {k}" for k in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if bound else []
    for (objective, eps, sparsity), r in sorted(bound.items()):
        lines.append("| " + " | ".join([objective, f"{eps:g}", f"{sparsity:.2f}", _f(r["clean"]),
                                         f"{_f(r['robust'])} ({r['attack']})",
                                         *[_f(r.get(k, (math.nan,))[0]) for k in methods],
                                         *[_f(r.get(k, (0, math.nan))[1], ".1f") for k in methods]]) + " |")
    if smooth:
        radii = sorted({k for *_, m, _p in smooth for k in m if k.startswith("certified_acc_at_")},
                       key=lambda k: float(k.rsplit("_", 1)[1]))
        at = " | ".join(f"r = {k.rsplit('_', 1)[1]}" for k in radii)
        # Beside the certificate, the empirical side: the base model's clean accuracy and its robust
        # accuracy under the cell's attack, and the smoothed classifier's under SmoothAdv + PREDICT.
        lines += ["", "| baseline | sparsity | sigma | n | clean (base) | robust (base, attack) "
                  f"| {at} | smoothed robust (SmoothAdv, r) | avg radius | abstain | s/1000 img (certify) |",
                  "|" + "---|" * (10 + len(radii))]
        for objective, sparsity, sigma, n, m, p in sorted(smooth, key=lambda t: (t[0], t[1])):
            attack = f"{p['attack.name']} {p.get('attack.norm')} {float(p['epsilon']):g}"
            smoothed = f"{_f(m.get('smoothed_robust_acc', math.nan))} ({p.get('certify.radius')})"
            lines.append("| " + " | ".join([objective, f"{sparsity:.2f}", str(sigma), str(n),
                                             _f(m["clean_acc"]), f"{_f(m['robust_acc'])} ({attack})",
                                             *[_f(m.get(k, math.nan)) for k in radii], smoothed,
                                             _f(m["certified_radius_mean"]), _f(m["abstain_rate"]),
                                             _f(1000 * m["certify_s"] / m["n_eval"], ".1f")]) + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
