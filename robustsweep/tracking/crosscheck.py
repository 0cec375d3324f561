"""Checks across the cells of a sweep, after they ran (the end-of-sweep callback calls them).

``eps_monotonicity``: cells differing only in epsilon attack the same images of the same model,
so a larger ball can only contain more adversarial examples; an ASR that falls as eps grows (beyond
``checks.tol``) tags the cell ``suspect=asr_falls_with_eps``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from robustsweep.tracking.identity import NOT_RESULTS
from robustsweep.tracking.store import exact_metrics
from robustsweep.tracking.sweep import SUSPECT_TAG, finished_children

log = logging.getLogger(__name__)

REASONS = {"asr_falls_with_eps": "ASR falls as eps grows (within the sweep): possible gradient masking"}



def eps_monotonicity(runs: Iterable[Any], tol: float) -> dict[str, str]:
    """Runs (MLflow) whose ASR is more than ``tol`` below that of a smaller eps with otherwise the
    same config: run_id -> message. Cells differing only in epsilon attack the same images of the
    same model, so a larger ball can only contain more adversarial examples."""
    # params that do not change a cell's numbers (perf.amp does: it stays in the grouping key)
    result_free = (*(f"{k}." for k in NOT_RESULTS if k != "perf"), "perf.reuse", "perf.cudnn")
    groups: dict[tuple, list[tuple[float, float, str]]] = {}
    for r in runs:
        p, m = r.data.params, exact_metrics(r)
        if "epsilon" not in p or "asr" not in m or math.isnan(m["asr"]):
            continue
        key = tuple(sorted((k, v) for k, v in p.items() if k != "epsilon" and not k.startswith(result_free)))
        groups.setdefault(key, []).append((float(p["epsilon"]), m["asr"], r.info.run_id))
    flagged: dict[str, str] = {}
    for cells in groups.values():
        cells.sort()
        best_eps, best = -1.0, -math.inf
        for eps, asr, run_id in cells:
            if asr < best - tol:
                flagged[run_id] = (f"asr {asr:.4f} at eps {eps * 255:.3g}/255 is below asr {best:.4f} "
                                   f"at eps {best_eps * 255:.3g}/255 (tolerance {tol})")
            if asr > best:
                best_eps, best = eps, asr
    return flagged


def check_sweep(client: Any, parent_run_id: str, tol: float) -> dict[str, str]:
    """Cross-cell checks over a sweep's FINISHED children; tags and returns the suspects."""
    flagged = eps_monotonicity(finished_children(client, parent_run_id), tol)
    for run_id, why in flagged.items():
        add_suspect(client, run_id, ["asr_falls_with_eps"])
        log.warning("suspect cell %s (asr_falls_with_eps): %s", run_id, why)
    return flagged


def add_suspect(client: Any, run_id: str, reasons: Iterable[str]) -> str:
    """Append reasons to a run's ``suspect`` tag (kept sorted, without duplicates)."""
    run = client.get_run(run_id)
    old = [r for r in run.data.tags.get(SUSPECT_TAG, "").split(",") if r]
    value = ",".join(sorted(set(old) | set(reasons)))
    client.set_tag(run_id, SUSPECT_TAG, value)
    return value
