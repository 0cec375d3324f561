"""The study write-up: a Markdown page with tables, verdicts and a provenance card, from the store.

``python -m robustsweep.report --experiment NAME --out DIR`` calls ``write_page``. What it reads is
only what cells logged: their params, metrics (the ``paired`` evaluator's differences against the
dense reference), tags (git commit, versions, machine, data fingerprint) and ``outcomes.csv``.

* A *condition* is every param but ``seed`` and the keys that only add evaluators or say where
  things are written (``REPLICATE_BLIND``): cells that differ only in ``seed`` are its replicates.
* Each condition's row: levels (mean over seeds, and their spread), and the paired differences
  against the reference with a 95 % interval: one seed -> the cell's own paired bootstrap over
  images; several -> ``core.stats.replicate_interval`` over seeds, then images, from the cells'
  ``outcomes.csv`` (the reference's predictions are on the same rows).
* One verdict sentence per difference, generated from the interval, never from the point alone:
  "rises by 30.8 points [27.2, 34.4]" only when the whole interval is above 0, otherwise "no change
  larger than 4.0 points is detectable".
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from robustsweep.core.stats import replicate_interval
from robustsweep.summary import attack_label, compression_label

log = logging.getLogger(__name__)

# Params that do not make two cells different conditions: the replicate index itself, where things
# are written, and evaluators that add metrics without changing the robust evaluator's.
REPLICATE_BLIND = ("seed", "paths.", "tracking.", "efficiency.", "checks.", "attribution.", "drift.",
                   "transfer.", "min_norm.", "certify.", "search", "perf.reuse", "device")
DELTAS = (("delta_asr_common", "ASR on the images both models classify correctly"),
          ("delta_robust_acc", "robust accuracy"), ("delta_clean_acc", "clean accuracy"))


def condition_of(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in params.items() if not k.startswith(REPLICATE_BLIND)))


@dataclass
class Condition:
    cells: list[dict[str, Any]]  # one per seed (the newest FINISHED run of each cell)
    deltas: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # name -> (d, lo, hi)
    problems: list[str] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.cells[0]

    @property
    def seeds(self) -> list[str]:
        return sorted({c["params"].get("seed", "?") for c in self.cells})

    def level(self, metric: str) -> tuple[float, float]:
        """Mean over seeds and the seed-to-seed standard deviation (nan with one seed)."""
        vals = [c["all_metrics"].get(metric, math.nan) for c in self.cells]
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan

    @property
    def is_reference(self) -> bool:
        """Uncompressed: the cell's model is the dense baseline itself (its own reference)."""
        return all(c["tags"].get("robustsweep.model_sha256") == c["tags"].get("robustsweep.dense_sha256")
                   for c in self.cells)


def verdict(what: str, d: float, lo: float, hi: float) -> str:
    """One sentence from an interval (fractions in, points out)."""
    if any(math.isnan(v) for v in (d, lo, hi)):
        return f"{what}: not measurable here"
    pts = f"{abs(d) * 100:.1f} points [{lo * 100:+.1f}, {hi * 100:+.1f}]"
    if lo > 0:
        return f"{what} rises by {pts}"
    if hi < 0:
        return f"{what} falls by {pts}"
    return (f"no change in {what} larger than {max(abs(lo), abs(hi)) * 100:.1f} points is detectable "
            f"(estimate {d * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}])")


def _outcomes(client: Any, cell: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The cell's per-image outcomes with its reference's, or None (an older cell: no such columns)."""
    from robustsweep.tracking.outcomes import run_outcomes

    try:
        o = run_outcomes(client, cell["run_id"])
    except Exception:
        return None
    return o if "ref_adv_ok" in o else None


def _replicate_deltas(client: Any, cond: Condition) -> None:
    """Intervals over seeds then images, from each replicate's outcomes.csv."""
    per = [_outcomes(client, c) for c in cond.cells]
    missing = [c["run_id"] for c, o in zip(cond.cells, per, strict=True) if o is None]
    if missing:
        cond.problems.append(f"replicates {', '.join(missing)} have no outcomes.csv with the reference's "
                             f"predictions (logged before the paired evaluator): their differences are "
                             f"not pooled; re-run them to add them")
        return
    got = [o for o in per if o is not None]
    for name, a_key, b_key in (("delta_clean_acc", "ref_clean_ok", "clean_ok"),
                               ("delta_robust_acc", "ref_adv_ok", "adv_ok")):
        cond.deltas[name] = replicate_interval([o[a_key] for o in got], [o[b_key] for o in got])
    common = [o["clean_ok"] & o["ref_clean_ok"] for o in got]
    if all(c.any() for c in common):
        cond.deltas["delta_asr_common"] = replicate_interval(
            [~o["ref_adv_ok"][c] for o, c in zip(got, common, strict=True)],
            [~o["adv_ok"][c] for o, c in zip(got, common, strict=True)])


def conditions(client: Any, cells: list[dict[str, Any]]) -> list[Condition]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[condition_of(c["params"])].append(c)
    out = []
    for members in groups.values():
        cond = Condition(sorted(members, key=lambda c: c["params"].get("seed", "")))
        if "delta_clean_acc" not in cond.first["all_metrics"]:
            cond.problems.append(f"cell {cond.first['run_id']} has no paired differences (logged before the "
                                 f"paired evaluator; re-run it in a fresh store to add them)")
        elif len(cond.cells) == 1:
            m = cond.first["all_metrics"]
            cond.deltas = {d: (m.get(d, math.nan), m.get(f"{d}_lo", math.nan), m.get(f"{d}_hi", math.nan))
                           for d, _ in DELTAS}
        else:
            _replicate_deltas(client, cond)
        out.append(cond)
    return sorted(out, key=lambda c: (attack_label(c.first), c.first["epsilon"], compression_label(c.first),
                                      c.first["sparsity"]))


# what compression_label, the table's heading or the seed already say about a cell
_LABELLED = ("prune.method", "sparsity", "quantize.", "defend.name", "defend.epochs", "prune.schedule",
             "prune.steps", "compress.bn_recalibrate", "attack.", "epsilon")


def _varying(conds: list[Condition]) -> list[str]:
    """Params that differ between conditions and that no label shows yet (e.g. train.label_smoothing,
    objective.name, prune.score_epochs): each row names its value."""
    keys = {k for c in conds for k in c.first["params"]}
    return sorted(k for k in keys if not k.startswith(_LABELLED + REPLICATE_BLIND)
                  and len({c.first["params"].get(k) for c in conds}) > 1)


def _row_label(cell: dict[str, Any], varying: list[str] = ()) -> str:
    extra = [f"{k}={cell['params'].get(k, '–')}" for k in varying]
    return compression_label(cell) + (f" ({', '.join(extra)})" if extra else "")


def _fmt_delta(t: tuple[float, float, float] | None) -> str:
    if t is None or any(math.isnan(v) for v in t):
        return "–"
    d, lo, hi = t
    return f"{d * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"


def _fmt_level(mean: float, sd: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")


def provenance(cells: list[dict[str, Any]], note: str) -> list[str]:
    def values(key: str, where: str = "tags") -> str:
        return ", ".join(sorted({str(c[where].get(key, "not recorded")) for c in cells}))

    seeds = sorted({c["params"].get("seed", "?") for c in cells}, key=lambda s: (len(s), s))
    lines = ["## Provenance", "",
             f"- cells: {len(cells)}; seeds: {', '.join(seeds)}; evaluation images per cell: "
             f"{values('n_eval', 'all_metrics')} (test-split subset seed "
             f"{values('data.subset_seed', 'params')})",
             f"- data: {values('data.name', 'params')}"
             + (f" from {values('data.root', 'params')}" if any("data.root" in c["params"] for c in cells)
                else "")
             + f"; fingerprint of the evaluation pixels (SHA-256): {values('robustsweep.data_sha256')}",
             f"- code: git commit {values('mlflow.source.git.commit')}",
             f"- packages: {values('robustsweep.versions')}",
             f"- machine: {values('robustsweep.machine')}",
             f"- cells run from {_when(min(c['start'] or 0 for c in cells))} to "
             f"{_when(max(c['start'] or 0 for c in cells))}"]
    if note:
        lines.append(f"- note: {note}")
    return lines


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_page(client: Any, experiment: str, cells: list[dict[str, Any]], out_dir: Path, *,
               studies: list[Any] = (), note: str = "", command: str | None = None) -> Path:
    """``out_dir/README.md``: one table per attack and eps, verdicts, cliff studies, provenance."""
    conds = conditions(client, cells)
    varying = _varying(conds)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command or "python -m robustsweep.report " + " ".join(sys.argv[1:])
    lines = [f"# {experiment}: results", "",
             f"Written by `{cmd}` on {datetime.now(UTC):%Y-%m-%d %H:%M UTC} from the store; do not edit by "
             f"hand.",
             "", "Differences are the cell minus its reference (the same condition uncompressed: the dense "
             "model, same images and seed), in points, with 95 % intervals: over images (paired bootstrap) "
             "for one seed, over seeds then images when there are replicates. ASR is compared on the images "
             "both models classify correctly. Levels are means over seeds ± their standard deviation.", ""]
    by_attack: dict[tuple[str, float], list[Condition]] = defaultdict(list)
    for c in conds:
        by_attack[(attack_label(c.first), c.first["epsilon"])].append(c)
    verdicts: list[str] = []
    problems: list[str] = []
    for (attack, eps), group in by_attack.items():
        lines += [f"## {attack} at eps {eps:.4g}", "",
                  "| compression | seeds | clean | robust | ASR | Δ clean | Δ robust | Δ ASR (common) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in group:
            cols = [_row_label(c.first, varying), str(len(c.seeds)),
                    *(_fmt_level(*c.level(m)) for m in ("clean_acc", "robust_acc", "asr")),
                    *(_fmt_delta(c.deltas.get(d)) for d in
                      ("delta_clean_acc", "delta_robust_acc", "delta_asr_common"))]
            lines.append("| " + " | ".join(cols) + " |")
            problems += c.problems
            if c.deltas and not c.is_reference:
                said = "; ".join(verdict(w, *c.deltas[d]) for d, w in DELTAS if d in c.deltas)
                verdicts.append(f"- {attack} eps {eps:.4g}, {_row_label(c.first, varying)} "
                                f"({len(c.seeds)} seed{'s' if len(c.seeds) > 1 else ''}): {said}.")
        lines.append("")
    lines += ["## Verdicts", "", *(verdicts or ["- no compressed cell with a reference comparison"]), ""]
    spread = [c for c in conds if len(c.cells) > 1 and not c.is_reference]
    if spread:
        lines += ["## Seed-to-seed spread beside the image-level interval", "",
                  "| condition | SD over seeds of Δ robust | median image-level half-width |", "|---|---|---|"]
        for c in spread:
            ds = [c_["all_metrics"].get("delta_robust_acc", math.nan) for c_ in c.cells]
            hw = [(c_["all_metrics"].get("delta_robust_acc_hi", math.nan)
                   - c_["all_metrics"].get("delta_robust_acc_lo", math.nan)) / 2 for c_ in c.cells]
            lines.append(f"| {attack_label(c.first)} {c.first['epsilon']:.4g} {_row_label(c.first, varying)} | "
                         f"{statistics.stdev(ds) * 100:.1f} points | {statistics.median(hw) * 100:.1f} "
                         f"points |")
        lines.append("")
    if studies:
        lines += ["## Cliff searches", ""]
        for s in studies:
            m, t = s.data.metrics, s.data.tags
            text = (f"- {s.info.run_name}: safe up to {m.get('cliff_low', math.nan):.3f}, unsafe from "
                    f"{m.get('cliff_high', math.nan):.3f}")
            if t.get("robustsweep.cliff_unidentifiable"):
                text += f". **Cliff unidentifiable**: {t['robustsweep.cliff_unidentifiable']}"
            lines.append(text)
        lines.append("")
    if problems:
        lines += ["## What is missing", "", *(f"- {p}" for p in problems), ""]
        for p in problems:
            log.warning("%s", p)
    lines += [*provenance(cells, note), ""]
    page = out_dir / "README.md"
    page.write_text("\n".join(lines))
    return page

