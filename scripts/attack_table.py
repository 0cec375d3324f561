"""The README's attack table: robust accuracy per attack x threat model x sparsity from one MLflow
experiment, the minimum-norm medians, transfer, and the security curve against fixed-eps PGD.

    python scripts/attack_table.py --experiment attacks_cifar [--tracking-uri sqlite:///outputs/mlflow.db]

Reads the FINISHED cell runs of the experiment (the newest per cell id). Prints Markdown:
1. robust accuracy (clean accuracy in the first column) per sparsity and attack@eps, with the
   worst case over attacks per eps, and the cells tagged `suspect`;
2. per sparsity: median minimum-norm radius (from `min_norm=bisect` cells) and transfer ASR
   (dense -> pruned) beside the white-box ASR;
3. done-when "security curve": robust accuracy read off the widest min-norm search of each
   sparsity at every eps where a fixed-eps PGD cell exists, against that cell (in images).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow.tracking import MlflowClient

from robustsweep.core.params import eps_label
from robustsweep.tracking.sweep import newest_cell_runs

log = logging.getLogger("attack_table")
ORDER = ("fgsm", "pgd", "apgd", "square", "cw", "autoattack", "ensemble")


def cells(client: MlflowClient, experiment: str) -> list[dict[str, Any]]:
    runs = newest_cell_runs(client, experiment)
    if runs is None:
        raise SystemExit(f"no experiment {experiment!r}")
    out = []
    for r in runs:
        if "attack.name" not in r.data.params:
            continue
        p = r.data.params
        out.append({"run_id": r.info.run_id, "attack": p["attack.name"], "norm": p.get("attack.norm") or "linf",
                    "eps": float(p["epsilon"]), "sparsity": float(p["sparsity"]), "m": r.data.metrics,
                    "suspect": r.data.tags.get("suspect", "")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--experiment", default="attacks_cifar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    client = MlflowClient(args.tracking_uri)
    cs = cells(client, args.experiment)
    sparsities = sorted({c["sparsity"] for c in cs})
    cols = sorted({(c["norm"], c["eps"], c["attack"]) for c in cs},
                  key=lambda k: (k[0] != "linf", -k[1] if k[0] == "linf" else k[1], ORDER.index(k[2])
                                 if k[2] in ORDER else 99))
    at = {(c["norm"], c["eps"], c["attack"], c["sparsity"]): c for c in cs}
    clean = {c["sparsity"]: c["m"]["clean_acc"] for c in cs}
    n_eval = int(cs[0]["m"]["n_eval"])

    print(f"Robust accuracy on {n_eval} images (share of all images; clean accuracy first):\n")
    head = ["sparsity", "clean"] + [f"{a} {eps_label(e, n)}" for n, e, a in cols]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for sp in sparsities:
        row = [f"{sp:.2f}", f"{clean.get(sp, math.nan):.3f}"]
        for n, e, a in cols:
            c = at.get((n, e, a, sp))
            row.append("–" if c is None else f"{c['m']['robust_acc']:.3f}" + (" *" if c["suspect"] else ""))
        print("| " + " | ".join(row) + " |")
    suspects = sorted({(c["attack"], c["norm"], eps_label(c["eps"], c["norm"]), c["sparsity"], c["suspect"])
                       for c in cs if c["suspect"]})
    print("\n* suspect: " + ("; ".join(f"{a} {e} s={s:.2f}: {t}" for a, _, e, s, t in suspects) or "none"))

    print("\nWorst case over the attacks per threat model (lowest robust accuracy) and which attack:\n")
    by_eps: dict[tuple[str, float], list[tuple[str, float]]] = defaultdict(list)
    for n, e, a in cols:
        by_eps[(n, e)].append((a, e))
    print("| sparsity | " + " | ".join(eps_label(e, n) for n, e in by_eps) + " |")
    print("|" + "---|" * (1 + len(by_eps)))
    for sp in sparsities:
        row = [f"{sp:.2f}"]
        for (n, e), atts in by_eps.items():
            vals = [(at[(n, e, a, sp)]["m"]["robust_acc"], a) for a, _ in atts if (n, e, a, sp) in at]
            row.append(f"{min(vals)[0]:.3f} ({min(vals)[1]})" if vals else "–")
        print("| " + " | ".join(row) + " |")

    mn = [c for c in cs if "min_norm_median" in c["m"]]
    if mn:
        print("\nMinimum-norm search and transfer (PGD cells with min_norm=bisect, transfer=dense):\n")
        print("| sparsity | threat model | eps | min-norm median | white-box ASR | transfer ASR (dense → "
              "pruned) |")
        print("|---|---|---|---|---|---|")
        for c in sorted(mn, key=lambda c: (c["norm"], c["eps"], c["sparsity"])):
            med = c["m"]["min_norm_median"]
            med_s = f"{med * 255:.2f}/255" if c["norm"] == "linf" else f"{med:.3f}"
            print(f"| {c['sparsity']:.2f} | {c['norm']} | {eps_label(c['eps'], c['norm'])} | {med_s} | "
                  f"{c['m']['asr']:.3f} | {c['m'].get('transfer_asr', math.nan):.3f} |")
        print("\nSecurity curve (widest min-norm search per sparsity) against fixed-eps PGD cells:\n")
        print("| sparsity | norm | eps | robust acc from the curve | fixed-eps PGD | gap (images) |")
        print("|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for norm in sorted({c["norm"] for c in mn}):
                for sp in sparsities:
                    src = [c for c in mn if c["norm"] == norm and c["sparsity"] == sp]
                    if not src:
                        continue
                    w = max(src, key=lambda c: c["m"]["min_norm_eps_max"])
                    with open(client.download_artifacts(w["run_id"], "min_norm/distances.csv", tmp)) as f:
                        d = [float(r["min_norm"]) for r in csv.DictReader(f)]
                    for c in sorted((c for c in cs if c["attack"] == "pgd" and c["norm"] == norm
                                     and c["sparsity"] == sp and c["eps"] <= w["m"]["min_norm_eps_max"]),
                                    key=lambda c: c["eps"]):
                        curve = sum(x > c["eps"] for x in d) / n_eval
                        fixed = c["m"]["robust_acc"]
                        gap = round((curve - fixed) * n_eval)
                        label = eps_label(c["eps"], norm)
                        print(f"| {sp:.2f} | {norm} | {label} | {curve:.3f} | {fixed:.3f} | {gap:+d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
