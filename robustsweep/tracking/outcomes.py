"""Per-image outcomes of logged cells (the robust evaluator's ``outcomes.csv`` artifact), and
paired comparisons between two cells on the same images (robustsweep.core.stats)."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from robustsweep.core.stats import mcnemar, paired_bootstrap

ARTIFACT = "outcomes.csv"


def read_outcomes(path: str | Path) -> dict[str, np.ndarray]:
    """index, label, clean_pred, adv_pred (int arrays), broken_by (str array), clean_ok, adv_ok."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {k: np.array([int(r[k]) for r in rows], dtype=np.int64)
           for k in ("index", "label", "clean_pred", "adv_pred")}
    out["broken_by"] = np.array([r["broken_by"] for r in rows], dtype=object)
    out["clean_ok"] = out["clean_pred"] == out["label"]
    out["adv_ok"] = out["clean_ok"] & (out["adv_pred"] == out["label"])
    return out


def run_outcomes(client: Any, run_id: str) -> dict[str, np.ndarray]:
    """The outcomes of one MLflow run (downloaded to a temporary folder). A run that reuses another's
    result (tag ``robustsweep.reused_from``: a study trial whose cell another sweep computed) has no
    artifacts of its own: the original's are read."""
    run_id = client.get_run(run_id).data.tags.get("robustsweep.reused_from") or run_id
    with tempfile.TemporaryDirectory() as tmp:
        return read_outcomes(client.download_artifacts(run_id, ARTIFACT, tmp))


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n_boot: int = 2000,
            seed: int = 0) -> dict[str, float]:
    """Cell b against cell a on the same images: clean and robust accuracy differences (b - a) with
    95 % paired-bootstrap intervals and exact McNemar p-values; ASR difference on the images both
    classify correctly (so both ASRs have the same denominator)."""
    if not np.array_equal(a["index"], b["index"]):
        raise ValueError("the two cells were evaluated on different images (outcomes.csv index columns "
                         "differ): a paired comparison needs the same data.n_eval and subset seed")
    out: dict[str, float] = {"n_images": float(len(a["index"]))}
    for name in ("clean_ok", "adv_ok"):
        key = "clean_acc" if name == "clean_ok" else "robust_acc"
        d, lo, hi = paired_bootstrap(a[name], b[name], n_boot, seed)
        out.update({f"{key}_diff": d, f"{key}_diff_lo": lo, f"{key}_diff_hi": hi,
                    f"{key}_mcnemar_p": mcnemar(a[name], b[name])})
    both = a["clean_ok"] & b["clean_ok"]
    if both.any():
        fa, fb = ~a["adv_ok"][both], ~b["adv_ok"][both]
        d, lo, hi = paired_bootstrap(fa, fb, n_boot, seed)
        out.update({"asr_diff_common": d, "asr_diff_common_lo": lo, "asr_diff_common_hi": hi,
                    "asr_common_mcnemar_p": mcnemar(~fa, ~fb), "n_common": float(both.sum())})
    return out
