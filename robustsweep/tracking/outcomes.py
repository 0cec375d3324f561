"""Per-image outcomes of logged cells (the robust evaluator's ``outcomes.csv`` artifact), and
paired comparisons between two cells on the same images (robustsweep.core.stats)."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from robustsweep.core.stats import paired_deltas

ARTIFACT = "outcomes.csv"


def read_outcomes(path: str | Path) -> dict[str, np.ndarray]:
    """index, label, clean_pred, adv_pred (int arrays), broken_by (str array), clean_ok, adv_ok; and
    ref_clean_pred, ref_adv_pred, ref_clean_ok, ref_adv_ok where the paired evaluator added them."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {k: np.array([int(r[k]) for r in rows], dtype=np.int64)
           for k in ("index", "label", "clean_pred", "adv_pred")}
    out["broken_by"] = np.array([r["broken_by"] for r in rows], dtype=object)
    out["clean_ok"] = out["clean_pred"] == out["label"]
    out["adv_ok"] = out["clean_ok"] & (out["adv_pred"] == out["label"])
    if rows and "ref_adv_pred" in rows[0]:  # the paired evaluator's columns: the dense reference's
        for k in ("ref_clean_pred", "ref_adv_pred"):
            out[k] = np.array([int(r[k]) for r in rows], dtype=np.int64)
        out["ref_clean_ok"] = out["ref_clean_pred"] == out["label"]
        out["ref_adv_ok"] = out["ref_clean_ok"] & (out["ref_adv_pred"] == out["label"])
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
    """Cell b against cell a on the same images (``core.stats.paired_deltas``, a as the reference:
    ``delta_*`` = b - a) and ``n_images``."""
    if not np.array_equal(a["index"], b["index"]):
        raise ValueError("the two cells were evaluated on different images (outcomes.csv index columns "
                         "differ): a paired comparison needs the same data.n_eval and subset seed")
    return {"n_images": float(len(a["index"])),
            **paired_deltas(a["clean_ok"], a["adv_ok"], b["clean_ok"], b["adv_ok"], n_boot=n_boot, seed=seed)}
