"""Is cell B really different from cell A? A paired comparison over their evaluation images.

    python scripts/paired.py RUN_ID_A RUN_ID_B [--tracking-uri sqlite:///outputs/mlflow.db]

Both cells must have been evaluated on the same images (same data and data.n_eval): their
``outcomes.csv`` artifacts (one row per image) are compared image by image. Prints the clean and
robust accuracy differences (B - A) with 95 % paired-bootstrap intervals and exact McNemar p-values,
and the ASR difference on the images both classify correctly. Two sparsities whose ASRs differ by
a point on 500 images are usually *not* distinguishable; this says which are.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow.tracking import MlflowClient

from robustsweep.tracking.outcomes import compare, run_outcomes

log = logging.getLogger("paired")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="MLflow run id of cell A")
    ap.add_argument("b", help="MLflow run id of cell B")
    ap.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
