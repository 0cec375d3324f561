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
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from robustsweep.core.params import eps_label
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
    """The params that make a condition. At sparsity 0 the prune method changes nothing (no weight is
    pruned): the dense cells of a sweep over methods are one condition, not one per method."""
    blind = REPLICATE_BLIND + (("prune.",) if _float(params.get("sparsity")) == 0.0 else ())
    return tuple(sorted((k, v) for k, v in params.items() if not k.startswith(blind)))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Condition:
    cells: list[dict[str, Any]]  # one per seed (the newest FINISHED run of each cell)
    deltas: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # name -> (d, lo, hi)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how its differences were obtained, when unusual

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
        """Uncompressed: its own reference (the model is the dense baseline itself)."""
        return _uncompressed(self.first)


@dataclass(frozen=True)
class Claim:
    """A claimed range for one difference (in points) under one attack and budget, for the rows
    whose label contains ``rows``: ``"fgsm 8/255 | 0.75 | delta_asr_common | 30 | 45"``."""

    attack: str  # attack label and eps as the page's headings write them: "fgsm 8/255"
    rows: str  # a substring of the row labels it is about ("0.75": every method at 75 %)
    metric: str  # one of DELTAS
    low: float  # the claimed range, points
    high: float

    @classmethod
    def parse(cls, text: str) -> Claim:
        parts = [p.strip() for p in text.split("|")]
        allowed = ("'ATTACK EPS | ROW SUBSTRING | DELTA | LOW | HIGH' (points), e.g. "
                   "'fgsm 8/255 | 0.75 | delta_asr_common | 30 | 45'; DELTA one of "
                   + ", ".join(d for d, _ in DELTAS))
        try:
            attack, rows, metric, low, high = parts
            claim = cls(attack, rows, metric, float(low), float(high))
        except ValueError:
            raise ValueError(f"--claim {text!r} is not valid; allowed: {allowed}") from None
        if metric not in dict(DELTAS) or claim.low > claim.high:
            raise ValueError(f"--claim {text!r} is not valid; allowed: {allowed}")
        return claim

    def judge(self, d: float, lo: float, hi: float) -> str:
        """From the interval only: inside the claimed range, outside it, or overlapping it."""
        lo, hi, d = lo * 100, hi * 100, d * 100
        rng = f"[{self.low:+.1f}, {self.high:+.1f}]"
        got = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        if math.isnan(lo) or math.isnan(hi):
            return f"not measurable ({got})"
        if self.low <= lo and hi <= self.high:
            return f"**consistent**: the whole interval {got} is inside the claimed {rng}"
        if hi < self.low or lo > self.high:
            return f"**refuted**: the interval {got} lies outside the claimed {rng}"
        return f"**inconclusive**: the interval {got} overlaps the claimed {rng} and extends beyond it"


def judge_claims(claims: list[Claim], conds: list[Condition], varying: list[str]) -> list[str]:
    """One line per claim and matching row: the verdict of its interval against the claimed range."""
    lines = []
    for cl in claims:
        rows = [c for c in conds if f"{attack_label(c.first)} {_eps(c.first)}" == cl.attack
                and cl.rows in _row_label(c.first, varying) and not c.is_reference]
        what = dict(DELTAS)[cl.metric]
        if not rows:
            lines.append(f"- {cl.attack}, rows with '{cl.rows}', {what}: no such row in this experiment")
        for c in rows:
            t = c.deltas.get(cl.metric)
            said = _saturated(c, cl.metric, what) or (cl.judge(*t) if t else "no paired difference logged")
            lines.append(f"- {cl.attack}, {_row_label(c.first, varying)} ({_n_seeds(c)}), change in {what}: "
                         f"{said}" + (" († collapsed model)" if _collapsed(c) else ""))
    return lines


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


# What a cell's reference shares with it: the trained model (model, data, recipe, objective, seed)
# and the evaluation (attack, eps, images, arithmetic). The reference itself is uncompressed.
_REFERENCE_KEYS = ("model.", "data.", "train.", "objective.", "attack.", "epsilon", "seed", "perf.amp")


def _uncompressed(cell: dict[str, Any]) -> bool:
    p = cell["params"]
    return (float(p.get("sparsity", "nan")) == 0.0 and p.get("quantize.name", "none") == "none"
            and p.get("defend.name", "none") == "none")


def _reference_key(cell: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in cell["params"].items() if k.startswith(_REFERENCE_KEYS)))


def _pairs(client: Any, cond: Condition, refs: dict[tuple, dict[str, Any]]) -> list[tuple[Any, Any]] | None:
    """Per replicate: (reference's outcomes, cell's outcomes) as (clean_ok, adv_ok) pairs. From the
    cell's outcomes.csv where the paired evaluator added the reference's columns; else from the
    reference cell stored in the same experiment (older cells), on the same images."""
    out = []
    for cell in cond.cells:
        try:
            from robustsweep.tracking.outcomes import run_outcomes

            o = run_outcomes(client, cell["run_id"])
        except Exception:  # no artifact: said in the page
            cond.problems.append(f"cell {cell['run_id']} ({_row_label(cell)}, seed "
                                 f"{cell['params'].get('seed')}) has no outcomes.csv: no paired difference "
                                 f"for it")
            return None
        if "ref_adv_ok" in o:
            out.append(((o["ref_clean_ok"], o["ref_adv_ok"]), (o["clean_ok"], o["adv_ok"])))
            continue
        ref = refs.get(_reference_key(cell))
        if ref is None:
            cond.problems.append(f"cell {cell['run_id']} ({_row_label(cell)}, seed "
                                 f"{cell['params'].get('seed')}) has no paired differences (logged before the "
                                 f"paired evaluator) and its "
                                 f"reference (the same model, seed, attack and images uncompressed) is not in "
                                 f"this experiment: run it, or re-run the cell in a fresh store")
            return None
        r = run_outcomes(client, ref["run_id"])
        if not np.array_equal(r["index"], o["index"]):
            cond.problems.append(f"cell {cell['run_id']} and its stored reference {ref['run_id']} were "
                                 f"evaluated on different images: no paired difference")
            return None
        cond.notes.append(f"computed by the report against stored reference {ref['run_id']}")
        out.append(((r["clean_ok"], r["adv_ok"]), (o["clean_ok"], o["adv_ok"])))
    return out


def _deltas_from_outcomes(pairs: list[tuple[Any, Any]]) -> dict[str, tuple[float, float, float]]:
    """Intervals over seeds then images (one seed: over images), from per-seed pairs of
    ((reference clean_ok, adv_ok), (cell clean_ok, adv_ok))."""
    out = {name: replicate_interval([r[i] for r, _ in pairs], [c[i] for _, c in pairs])
           for name, i in (("delta_clean_acc", 0), ("delta_robust_acc", 1))}
    common = [r[0] & c[0] for r, c in pairs]
    if all(m.any() for m in common):
        out["delta_asr_common"] = replicate_interval(
            [~r[1][m] for (r, _), m in zip(pairs, common, strict=True)],
            [~c[1][m] for (_, c), m in zip(pairs, common, strict=True)])
    return out


def conditions(client: Any, cells: list[dict[str, Any]]) -> list[Condition]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[condition_of(c["params"])].append(c)
    refs = {_reference_key(c): c for c in cells if _uncompressed(c)}
    out = []
    for members in groups.values():
        newest: dict[str, dict[str, Any]] = {}  # one cell per seed: the newest (an older id scheme, a re-run)
        for c in sorted(members, key=lambda c: c["start"] or 0):
            newest[c["params"].get("seed", "")] = c
        cond = Condition(sorted(newest.values(), key=lambda c: c["params"].get("seed", "")))
        if len(cond.cells) == 1 and "delta_clean_acc" in cond.first["all_metrics"]:
            m = cond.first["all_metrics"]  # what the cell logged (its paired bootstrap over images)
            cond.deltas = {d: (m.get(d, math.nan), m.get(f"{d}_lo", math.nan), m.get(f"{d}_hi", math.nan))
                           for d, _ in DELTAS}
        elif _uncompressed(cond.first):
            cond.deltas = {d: (0.0, 0.0, 0.0) for d, _ in DELTAS}  # its own reference
        else:
            pairs = _pairs(client, cond, refs)
            if pairs is not None:
                cond.deltas = _deltas_from_outcomes(pairs)
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
    # a key only some cells have (a component's own keys, e.g. defend.eps) counts where it is present
    return sorted(k for k in keys if not k.startswith(_LABELLED + REPLICATE_BLIND)
                  and len({c.first["params"][k] for c in conds if k in c.first["params"]}) > 1)


def _row_label(cell: dict[str, Any], varying: list[str] = ()) -> str:
    extra = [f"{k}={cell['params'][k]}" for k in varying if k in cell["params"]]
    return compression_label(cell) + (f" ({', '.join(extra)})" if extra else "")


def _eps(cell: dict[str, Any]) -> str:
    return eps_label(cell["epsilon"], cell.get("attack.norm") or "linf")


def _attacked(cond: Condition) -> bool:
    """False for ``attack=none`` (the attack group's "off" option): only clean accuracy means anything."""
    return cond.first["params"].get("attack.name", "none") != "none"


def _collapsed(cond: Condition) -> bool:
    return any("collapsed" in c.get("suspect", "").split(",") for c in cond.cells)


def _n_seeds(cond: Condition) -> str:
    return f"{len(cond.seeds)} seed{'s' if len(cond.seeds) > 1 else ''}"


def _saturated(cond: Condition, delta: str, what: str) -> str | None:
    """The words for a difference that cannot move: the dense reference is already broken on every
    image it classifies correctly (its ASR 1.0 in every seed), so ASR cannot rise and robust accuracy
    cannot fall. None when it can."""
    if delta not in ("delta_asr_common", "delta_robust_acc"):
        return None
    ref = [c["all_metrics"].get("ref_asr", math.nan) for c in cond.cells]
    if not ref or any(not r >= 1.0 for r in ref):
        return None
    return (f"{what}: saturated, not measurable here (the dense model's ASR is already 1.000 in every seed: "
            f"no rise in ASR, no fall in robust accuracy can show; a smaller eps can)")


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
             f"{', '.join(sorted({str(int(c['all_metrics'].get('n_eval', 0))) for c in cells}))} "
             f"(test-split subset seed "
             f"{values('data.subset_seed', 'params')})",
             f"- data: {values('data.name', 'params')}"
             + (f" from {values('data.root', 'params')}" if any("data.root" in c["params"] for c in cells)
                else "")
             + f"; fingerprint of the evaluation pixels (SHA-256): {values('robustsweep.data_sha256')}",
             f"- code: git commit {values('mlflow.source.git.commit')}",
             f"- packages: {values('robustsweep.versions')}",
             f"- machine: {values('robustsweep.machine')}",
             f"- cells run from {_when(min(c['start'] or 0 for c in cells))} to "
             f"{_when(max(c['start'] or 0 for c in cells))}",
             f"- dense baselines, clean accuracy on the whole test split: {_baselines(cells)}"]
    if note:
        lines.append(f"- note: {note}")
    return lines


def _baselines(cells: list[dict[str, Any]]) -> str:
    """Each dense baseline once (model, data, training recipe and objective, seed: what its cache key
    holds) with the test accuracy its cells logged."""
    acc: dict[tuple[tuple[str, str], ...], set[str]] = defaultdict(set)
    for c in cells:
        key = tuple(sorted((k, v) for k, v in c["params"].items()
                           if k.startswith(("model.", "data.", "train.", "objective.")) or k == "seed"))
        if (a := c["all_metrics"].get("baseline_test_acc")) is not None:
            acc[key].add(f"{a:.4f}")
    if not acc:
        return "not recorded"
    varying = sorted({k for key in acc for k, _ in key if k != "seed"
                      and len({dict(other).get(k) for other in acc}) > 1})
    out = []
    for key, vals in sorted(acc.items(), key=lambda kv: (dict(kv[0]).get("seed", ""), kv[0])):
        d = dict(key)
        label = ", ".join([f"seed {d.get('seed', '?')}", *(f"{k}={d.get(k)}" for k in varying)])
        out.append(f"{label}: {'/'.join(sorted(vals))}")
    return "; ".join(out)


def _seed_outcomes(client: Any, cond: Condition) -> dict[str, dict[str, np.ndarray]]:
    from robustsweep.tracking.outcomes import run_outcomes

    out = {}
    for c in cond.cells:
        try:
            out[c["params"].get("seed", "?")] = run_outcomes(client, c["run_id"])
        except Exception:  # no artifact: that seed is left out, and said
            cond.problems.append(f"cell {c['run_id']} has no outcomes.csv: left out of the comparisons")
    return out


def against(client: Any, conds: list[Condition], label: str, varying: list[str]) -> list[str]:
    """Every condition against the one whose row is ``label``, per attack and eps, on the same images
    and seeds: the differences (row - ``label``) with intervals over seeds then images, and verdicts."""
    lines = [f"## Against {label}", "", f"Each row minus `{label}`, in points, on the same images and seeds.",
             ""]
    groups: dict[tuple[str, float], list[Condition]] = defaultdict(list)
    for c in conds:
        groups[(attack_label(c.first), c.first["epsilon"])].append(c)
    found = False
    for (attack, _), group in groups.items():
        base = next((c for c in group if _row_label(c.first, varying) == label), None)
        if base is None:
            continue
        found = True
        b_out = _seed_outcomes(client, base)
        lines += [f"{attack} at eps {_eps(base.first)}:", "",
                  "| compression | seeds | Δ clean | Δ robust | Δ ASR (common) |", "|---|---|---|---|---|"]
        said = []
        for c in group:
            if c is base:
                continue
            c_out = _seed_outcomes(client, c)
            seeds = sorted(set(b_out) & set(c_out))
            seeds = [s for s in seeds if np.array_equal(b_out[s]["index"], c_out[s]["index"])]
            if not seeds:
                lines.append(f"| {_row_label(c.first, varying)} | 0 | – | – | – |")
                continue
            d = _deltas_from_outcomes([((b_out[s]["clean_ok"], b_out[s]["adv_ok"]),
                                        (c_out[s]["clean_ok"], c_out[s]["adv_ok"])) for s in seeds])
            cols = [_fmt_delta(d.get(k)) for k in ("delta_clean_acc", "delta_robust_acc", "delta_asr_common")]
            lines.append(f"| {_row_label(c.first, varying)} | {len(seeds)} | " + " | ".join(cols) + " |")
            said.append(f"- {_row_label(c.first, varying)} vs {label} ({attack} eps {_eps(c.first)}): "
                        + "; ".join(verdict(w, *d[k]) for k, w in DELTAS if k in d) + ".")
        lines += ["", *said, ""]
    if not found:
        names = sorted({_row_label(c.first, varying) for c in conds})
        log.warning("--against %r: no such row; rows: %s", label, "; ".join(names))
        lines += [f"No row is labelled `{label}`; the rows are: " + "; ".join(f"`{n}`" for n in names), ""]
    return lines


def _other_intervals(conds: list[Condition], varying: list[str]) -> list[str]:
    """Table rows for every metric ``m`` a cell logged with ``m_lo``/``m_hi`` that is not a delta above."""
    rows = []
    skip = {d for d, _ in DELTAS}
    for c in conds:
        m = c.first["all_metrics"]
        for name in sorted(k for k in m if f"{k}_lo" in m and f"{k}_hi" in m and k not in skip):
            rows.append(f"| {attack_label(c.first)} {_eps(c.first)} {_row_label(c.first, varying)} | "
                        f"`{name}` | {_fmt_delta((m[name], m[f'{name}_lo'], m[f'{name}_hi']))} |")
    return rows


def _write_conditions(conds: list[Condition], varying: list[str], path: Path) -> None:
    """One row per condition (replicates aggregated): what the page's tables show, for a program."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attack", "epsilon", "condition", "n_seeds", "seeds",
                    *(f"{m}_{k}" for m in ("clean_acc", "robust_acc", "asr") for k in ("mean", "sd")),
                    *(f"{d}{k}" for d, _ in DELTAS for k in ("", "_lo", "_hi"))])
        for c in conds:
            levels = [v for m in ("clean_acc", "robust_acc", "asr") for v in c.level(m)]
            deltas = [v for d, _ in DELTAS for v in c.deltas.get(d, (math.nan,) * 3)]
            w.writerow([attack_label(c.first), c.first["epsilon"], _row_label(c.first, varying), len(c.seeds),
                        " ".join(c.seeds), *levels, *deltas])


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_page(client: Any, experiment: str, cells: list[dict[str, Any]], out_dir: Path, *,
               studies: list[Any] = (), note: str = "", command: str | None = None,
               against_labels: list[str] = (), claims: list[Claim] = ()) -> Path:
    """``out_dir/README.md``: one table per attack and eps, verdicts, cliff studies, provenance; and
    ``out_dir/conditions.csv``: the same per condition, for a program."""
    conds = conditions(client, cells)
    varying = _varying(conds)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command or "python -m robustsweep.report " + shlex.join(sys.argv[1:])  # quoted: copy and run it
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
    for (attack, _), group in by_attack.items():
        lines += [f"## {attack} at eps {_eps(group[0].first)}", "",
                  "| compression | seeds | clean | robust | ASR | Δ clean | Δ robust | Δ ASR (common) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in group:
            shown = ("clean_acc", "robust_acc", "asr") if _attacked(c) else ("clean_acc",)
            cols = [_row_label(c.first, varying) + (" †" if _collapsed(c) else ""), str(len(c.seeds)),
                    *(_fmt_level(*c.level(m)) if m in shown else "–"
                      for m in ("clean_acc", "robust_acc", "asr")),
                    *(_fmt_delta(c.deltas.get(d)) if d == "delta_clean_acc" or _attacked(c) else "–"
                      for d in ("delta_clean_acc", "delta_robust_acc", "delta_asr_common"))]
            lines.append("| " + " | ".join(cols) + " |")
            problems += c.problems
            if c.deltas and not c.is_reference:
                said = "; ".join(_saturated(c, d, w) or verdict(w, *c.deltas[d]) for d, w in DELTAS
                                 if d in c.deltas and (_attacked(c) or d == "delta_clean_acc"))
                said += "".join(f" ({n})" for n in sorted(set(c.notes)))
                if _collapsed(c):
                    said += ("; † the compressed model is collapsed (near-chance clean accuracy or most "
                             "classes never predicted): its ASR describes a broken model, not a robust one")
                verdicts.append(f"- {attack} eps {_eps(c.first)}, {_row_label(c.first, varying)} "
                                f"({_n_seeds(c)}): {said}.")
        lines.append("")
    lines += ["## Verdicts", "", *(verdicts or ["- no compressed cell with a reference comparison"]), ""]
    if claims:
        lines += ["## Claims", "", "Each claimed range (points) against the 95 % interval of the difference: "
                  "consistent only when the whole interval is inside it, refuted only when the whole "
                  "interval is outside it.", "", *judge_claims(list(claims), conds, varying), ""]
    for label in against_labels:
        lines += against(client, conds, label, varying)
    other = _other_intervals(conds, varying)
    if other:
        lines += ["## Other measurements with intervals", "",
                  "What cells logged with a 95 % interval beside the differences above (e.g. `bn_recal_gain`: "
                  "clean accuracy after minus before BatchNorm recalibration, same model and images), in "
                  "points; one seed each (the first).", "", "| condition | metric | value [95 %] |",
                  "|---|---|---|", *other, ""]
    spread = [c for c in conds if len(c.cells) > 1 and not c.is_reference]
    if spread:
        lines += ["## Seed-to-seed spread beside the image-level interval", "",
                  "| condition | SD over seeds of Δ robust | median image-level half-width |", "|---|---|---|"]
        for c in spread:
            ds = [c_["all_metrics"].get("delta_robust_acc", math.nan) for c_ in c.cells]
            hw = [(c_["all_metrics"].get("delta_robust_acc_hi", math.nan)
                   - c_["all_metrics"].get("delta_robust_acc_lo", math.nan)) / 2 for c_ in c.cells]
            lines.append(f"| {attack_label(c.first)} {_eps(c.first)} {_row_label(c.first, varying)} | "
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
    _write_conditions(conds, varying, out_dir / "conditions.csv")
    page = out_dir / "README.md"
    page.write_text("\n".join(lines))
    return page

