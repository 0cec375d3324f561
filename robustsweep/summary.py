"""A sweep at a glance: heatmaps, curves with 95 % Wilson intervals, attention drift, cells.csv.

Everything here reads only what is stored in MLflow (the parent's FINISHED child runs and their
``ig/attributions.npz``, ``min_norm/distances.csv``), so the same summary can be rebuilt later for any sweep
(``python -m robustsweep.report``). Files written to ``out_dir``:

  heatmap_asr.png, heatmap_robust_acc.png   sparsity x eps, one panel per (attack, prune method)
  curves.png                                clean_acc and asr vs sparsity, 95 % Wilson intervals
  attention_drift.png                       the same images' IG maps (clean input) per sparsity
  drift.png                                 attribution-drift metrics vs sparsity with 95 % bootstrap bands
  security_curves.png                       robust accuracy vs eps per sparsity (min_norm=bisect cells)
  pareto.png                                robust accuracy vs latency and size, Pareto fronts
  tradeoff.png                              clean vs robust accuracy per defence x sparsity (Tsipras et al.)
  certified.png                             certified vs empirical robust accuracy per sparsity (certify cells)
  cells.csv                                 every cell's params, metrics and `suspect` tag

Cells of a degenerate model (``suspect=collapsed``) are hatched in the heatmaps, crossed out in the
curves and marked in the attention-drift titles.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from robustsweep.core.params import eps_label
from robustsweep.tracking.store import exact_metrics, pruning_label

log = logging.getLogger(__name__)

KEY_PARAMS = ("model.name", "data.name", "objective.name", "prune.method", "quantize.name", "quantize.bits",
              "defend.name", "defend.epochs", "certify.name", "attack.name", "attack.norm", "sparsity",
              "epsilon", "seed")
COLLAPSED = "collapsed"  # the suspect reason of a degenerate model (robustsweep.steps.evaluate.robust)


def key_metrics() -> tuple[str, ...]:
    """cells.csv's metric columns: every metric a cell may return, as the steps declare them."""
    from robustsweep.pipeline import returned_metrics

    return returned_metrics()


def is_latency_noisy(cell: dict[str, Any]) -> bool:
    """Tagged ``suspect=latency_noisy`` (robustsweep.steps.efficiency): its latency is noise."""
    return "latency_noisy" in cell.get("suspect", "").split(",")


def is_collapsed(cell: dict[str, Any]) -> bool:
    """Tagged ``suspect=collapsed``; or, for runs stored before that tag, one predicted class."""
    return COLLAPSED in cell["suspect"].split(",") or cell.get("n_pred_classes", math.nan) <= 1


class SummaryError(RuntimeError):
    """Nothing to summarise (empty sweep, unknown parent)."""


def wilson(k: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for k successes out of n (NaNs when n == 0)."""
    if not n:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def collect_cells(client: Any, parent_run_id: str) -> list[dict[str, Any]]:
    """One dict per cell of a sweep (see ``cells_of``)."""
    from robustsweep.tracking.sweep import finished_children

    return cells_of(finished_children(client, parent_run_id))


def experiment_cells(client: Any, experiment_id: str) -> list[dict[str, Any]]:
    """Every cell of an experiment: all sweeps, single runs and study trials (see ``cells_of``)."""
    from robustsweep.tracking.sweep import ROLE_TAG

    return cells_of(client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'cell' AND "
                                       f"attributes.status = 'FINISHED'", max_results=50000))


def cells_of(runs: list[Any]) -> list[dict[str, Any]]:
    """One dict per cell (its newest FINISHED run, should a cell have several, e.g. with
    ``tracking.resume=false``): key params (typed), metrics, tags, run id, start time."""
    cells = []
    seen: set[str] = set()
    for r in sorted(runs, key=lambda r: -(r.info.start_time or 0)):
        cid = r.data.tags.get("robustsweep.cell_id", "")
        if cid and cid in seen:
            continue
        seen.add(cid)
        p, m = r.data.params, exact_metrics(r)
        cell = {"run_id": r.info.run_id, "cell_id": r.data.tags.get("robustsweep.cell_id", ""),
                "suspect": r.data.tags.get("suspect", ""), "tags": dict(r.data.tags),
                "start": r.info.start_time}
        for k in KEY_PARAMS:
            v = p.get(k, "")
            cell[k] = float(v) if k in ("sparsity", "epsilon") and v else v
        cell["attack.norm"] = cell["attack.norm"] or "linf"  # runs from before attack.norm: L-inf
        # one panel, curve, colour per way of pruning: the schedule and BN recalibration are part of it
        cell["prune.method"] = pruning_label(cell["prune.method"], p.get("prune.schedule", "oneshot"),
                                             p.get("prune.steps"), p.get("compress.bn_recalibrate"))
        cell["attack"] = attack_label(cell)
        cell.update({k: m.get(k, math.nan) for k in key_metrics()})
        cell["params"] = p
        cell["all_metrics"] = dict(m)  # with the families named at run time (certified_acc_at_<r>)
        cells.append(cell)
    return sorted(cells, key=lambda c: (attack_label(c), c["prune.method"], c["epsilon"], c["sparsity"]))


def attack_label(cell: dict[str, Any]) -> str:
    """What plots group and label by: the attack with its threat model ("pgd", "pgd L2")."""
    return cell.get("attack") or cell["attack.name"] + (" L2" if cell.get("attack.norm") == "l2" else "")


def _groups(cells: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    g: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        g[(attack_label(c), c["prune.method"])].append(c)
    return dict(sorted(g.items()))


def _eps_label(eps: float, attack: str = "") -> str:
    """``8/255`` for L-inf; ``L2 0.5`` when ``attack`` (a cell's "attack" label) is an L2 one."""
    return eps_label(eps, "l2" if attack.endswith(" L2") else "linf")


def heatmap(cells: list[dict[str, Any]], metric: str) -> plt.Figure:
    groups = _groups(cells)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1, 3.8), squeeze=False, constrained_layout=True)
    cmap = "magma_r" if metric == "asr" else "viridis"
    for ax, ((attack, method), cs) in zip(axes[0], groups.items(), strict=True):
        sps = sorted({c["sparsity"] for c in cs})
        epss = sorted({c["epsilon"] for c in cs})
        grid = np.full((len(sps), len(epss)), np.nan)
        collapsed = np.zeros_like(grid, dtype=bool)  # a degenerate model: the value means nothing
        for c in cs:
            i, j = sps.index(c["sparsity"]), epss.index(c["epsilon"])
            grid[i, j] = c[metric]
            collapsed[i, j] = is_collapsed(c)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto", origin="lower")
        for i in range(len(sps)):
            for j in range(len(epss)):
                v = grid[i, j]
                if collapsed[i, j]:  # hatched, and said in words
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                           edgecolor="0.5", linewidth=0))
                text = "–" if np.isnan(v) else f"{v:.2f}" + ("\ncollapsed" if collapsed[i, j] else "")
                ax.text(j, i, text, ha="center", va="center",
                        color="white" if (v > 0.55) == (metric == "asr") else "black", fontsize=9,
                        bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0} if collapsed[i, j] else None)
        ax.set_xticks(range(len(epss)), [_eps_label(e, attack) for e in epss])
        ax.set_yticks(range(len(sps)), [f"{s:.2f}" for s in sps])
        ax.set_xlabel("eps (L2, pixel units)" if attack.endswith(" L2") else "eps (L∞)")
        ax.set_ylabel("sparsity (fraction of weights zeroed)")
        ax.set_title(f"{metric}: {attack}, {method}", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label=metric + (" (share of correct images flipped)"
                                                           if metric == "asr" else " (share of all images)"))
    return fig


def _band(ax: plt.Axes, xs: list[float], ys: list[float], ks: list[float], ns: list[float],
          label: str, collapsed: list[bool] | None = None) -> None:
    """A line with its 95 % Wilson band (k successes out of n at each point)."""
    lo, hi = zip(*[wilson(k, n) for k, n in zip(ks, ns, strict=True)], strict=True)
    ax.plot(xs, ys, "o-", label=label)
    ax.fill_between(xs, lo, hi, alpha=0.18)
    bad = [(x, y) for x, y, c in zip(xs, ys, collapsed or [False] * len(xs), strict=True) if c]
    if bad:  # a degenerate model: its point is crossed out (one legend entry per panel)
        seen = "collapsed model" in ax.get_legend_handles_labels()[1]
        ax.plot(*zip(*bad, strict=True), "x", color="red", markersize=11, mew=2,
                label="_nolegend_" if seen else "collapsed model")


def curves(cells: list[dict[str, Any]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    # clean accuracy depends only on (prune method, sparsity): one curve per method
    by_method: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for c in cells:
        by_method[c["prune.method"]].setdefault(c["sparsity"], c)
    for method, d in sorted(by_method.items()):
        cs = [d[x] for x in sorted(d)]
        _band(axes[0], sorted(d), [c["clean_acc"] for c in cs], [c["n_correct"] for c in cs],
              [c["n_eval"] for c in cs], method, [is_collapsed(c) for c in cs])
    # ASR: one curve per (attack, method, eps), over the images the model got right
    lines: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        lines[(attack_label(c), c["prune.method"], c["epsilon"])].append(c)
    for (attack, method, eps), cs in sorted(lines.items()):
        cs = sorted(cs, key=lambda c: c["sparsity"])
        _band(axes[1], [c["sparsity"] for c in cs], [c["asr"] for c in cs],
              [c["n_fooled"] for c in cs], [c["n_correct"] for c in cs],
              f"{attack} {_eps_label(eps, attack)} ({method})", [is_collapsed(c) for c in cs])
    for ax, ylabel, title in ((axes[0], "clean accuracy", "clean accuracy (95 % Wilson interval)"),
                              (axes[1], "attack success rate",
                               "ASR over correctly classified images (95 % Wilson)")):
        ax.set_xlabel("sparsity (fraction of weights zeroed)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=7)
    return fig


def attention_drift(client: Any, cells: list[dict[str, Any]], max_images: int = 4) -> plt.Figure | None:
    """Rows: (group, image) at the group's largest eps; columns: sparsity. IG of the clean input."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (attack, method), cs in _groups(cells).items():
            eps = max(c["epsilon"] for c in cs)
            col = sorted((c for c in cs if c["epsilon"] == eps), key=lambda c: c["sparsity"])
            maps = []
            for c in col:
                try:
                    p = client.download_artifacts(c["run_id"], "ig/attributions.npz", tmp)
                except Exception:  # no attribution logged for this cell (attribution=none)
                    maps = []
                    break
                z = np.load(p)
                maps.append((c["sparsity"], z["ig_clean"].sum(1), z["images"], z["labels"], is_collapsed(c)))
            if maps:
                rows.append((f"{attack}, {method}, eps {_eps_label(eps, attack)}", maps))
    if not rows:
        return None
    n_img = min(max_images, min(len(m[0][1]) for _, m in rows))
    n_rows = len(rows) * n_img
    n_cols = 1 + max(len(m) for _, m in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(1.9 * n_cols, 6.5), 1.9 * n_rows + 0.7),
                             squeeze=False, constrained_layout=True)
    for g, (title, maps) in enumerate(rows):
        for i in range(n_img):
            r = g * n_img + i
            img = maps[0][2][i]
            axes[r, 0].imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                              cmap="gray" if img.shape[0] == 1 else None, interpolation="nearest")
            label = f"image {i} (label {int(maps[0][3][i])})"
            axes[r, 0].set_ylabel(f"{title}\n{label}" if i == 0 else label, fontsize=7)
            vmax = max(float(np.abs(m[1][i]).max()) for m in maps) or 1e-12
            for j, (sp, ig, _, _, bad) in enumerate(maps):
                im = axes[r, j + 1].imshow(ig[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                                           interpolation="nearest")
                if r == 0 or i == 0:
                    axes[r, j + 1].set_title(f"sparsity {sp:.2f}" + (" (collapsed)" if bad else ""),
                                             fontsize=8, color="red" if bad else "black")
            fig.colorbar(im, ax=axes[r, 1:].tolist(), shrink=0.8, label="IG (logit units)")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Attention drift: IG of the same clean images as sparsity grows\n"
                 "(true-label logit; symmetric colour scale shared along each row)", fontsize=9)
    return fig


DRIFT_PANELS = (("drift_spearman", "rank correlation of |attribution|\nwith the dense model's"),
                ("drift_topk", "top-10 % pixel overlap\nwith the dense model's"),
                ("drift_cosine", "cosine of the signed maps\nwith the dense model's"),
                ("ig_hf_share", "high-frequency share\n(energy above Nyquist/2)"),
                ("drift_hf_delta", "high-frequency share minus\nthe dense model's (same images)"),
                ("ig_gini", "concentration (Gini)\nof |attribution|"))


def drift_figure(cells: list[dict[str, Any]]) -> plt.Figure | None:
    """Each drift metric vs sparsity with its 95 % bootstrap band: one line per (prune method,
    attack, eps), solid for clean inputs, dashed for adversarial ones (None without drift)."""
    cells = [c for c in cells if not math.isnan(c.get("drift_spearman", math.nan))]
    if not cells:
        return None
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.6), constrained_layout=True)
    axes = grid.flatten()
    lines: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        lines[(c["prune.method"], attack_label(c), c["epsilon"])].append(c)
    for n, ((method, attack, eps), cs) in enumerate(sorted(lines.items())):
        cs = sorted(cs, key=lambda c: c["sparsity"])
        xs = [c["sparsity"] for c in cs]
        color = f"C{n % 10}"
        for ax, (metric, title) in zip(axes, DRIFT_PANELS, strict=True):
            for suffix, style in (("", "o-"), ("_adv", "s--")):
                ys = [c[metric + suffix] for c in cs]
                label = f"{method}, {attack} {_eps_label(eps, attack)}" + (" (adversarial)" if suffix else "")
                ax.plot(xs, ys, style, color=color, markersize=4, label=label)
                ax.fill_between(xs, [c[metric + suffix + "_lo"] for c in cs],
                                [c[metric + suffix + "_hi"] for c in cs], color=color, alpha=0.15)
            if metric == "ig_hf_share":
                ax.axhline(cs[0]["ig_hf_share_dense"], color=color, lw=0.8, ls=":")
            if metric == "drift_hf_delta":
                ax.axhline(0, color="0.4", lw=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("sparsity")
    axes[0].legend(fontsize=6)
    fig.suptitle("Attribution drift vs sparsity (mean over images, 95 % bootstrap band; dotted: the "
                 "dense model's high-frequency share)", fontsize=10)
    return fig


def security_curves(client: Any, cells: list[dict[str, Any]]) -> plt.Figure | None:
    """Robust accuracy against eps from the cells' minimum-norm searches (``min_norm=bisect``): one
    panel per (attack, prune method), one curve per sparsity, each from the cell with the widest
    search (the largest eps_max) at that sparsity."""
    cells = [c for c in cells if not math.isnan(c.get("min_norm_eps_max", math.nan))]
    if not cells:
        return None
    groups = _groups(cells)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.0 * len(groups), 3.8), squeeze=False,
                             constrained_layout=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ax, ((attack, method), cs) in zip(axes[0], groups.items(), strict=True):
            widest: dict[float, dict[str, Any]] = {}
            for c in sorted(cs, key=lambda c: c["min_norm_eps_max"]):
                widest[c["sparsity"]] = c  # the last, the widest, wins
            l2 = attack.endswith(" L2")
            for n, (sp, c) in enumerate(sorted(widest.items())):
                path = client.download_artifacts(c["run_id"], "min_norm/distances.csv", tmp)
                with open(path, newline="") as f:
                    d = np.array([float(r["min_norm"]) for r in csv.DictReader(f)])
                grid = np.linspace(0, c["min_norm_eps_max"], 201)
                acc = [(d > e).sum() / c["n_eval"] for e in grid]
                ax.plot(grid if l2 else grid * 255, acc, color=f"C{n % 10}",
                        label=f"sparsity {sp:.2f}" + (" (collapsed)" if is_collapsed(c) else ""),
                        ls="--" if is_collapsed(c) else "-")
            ax.set_xlabel("eps (L2, pixel units)" if l2 else "eps (/255, L∞)")
            ax.set_ylabel("robust accuracy (share of all images)")
            ax.set_ylim(0, 1)
            ax.set_title(f"security curve: {attack} min-norm search, {method}", fontsize=9)
            ax.legend(fontsize=7)
    return fig


def compression_label(cell: dict[str, Any]) -> str:
    """``dense``, or the compress methods and their levels (``global_l1 0.50``, ``fake 4b``,
    ``global_l1 0.50 + int8``, ``channel 0.50 + ft 2ep`` after a fine-tune, ``global_l1/gradual3+bn512
    0.75 + ft 1ep``): parts joined by " + ", each a method name and its level."""
    from robustsweep.steps import compress  # here: the report reads stores without torch until it must

    parts = [part for spec in compress.stages() if (part := spec.label(cell))]  # each stage's own
    if (cell.get("defend.name") or "none") != "none" and parts:
        parts.append(f"ft {cell.get('defend.epochs') or '?'}ep")
    return " + ".join(parts) or "dense"


def _method_of(cell: dict[str, Any]) -> str:
    """The compression without its levels (one colour per method in the Pareto figure)."""
    return " + ".join(p.split(" ")[0] for p in compression_label(cell).split(" + "))


def pareto_front(cost: list[float], value: list[float], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost, better value), by cost."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -sign * value[i]))
    front, best = [], -math.inf
    for i in order:
        if sign * value[i] > best:
            front.append(i)
            best = sign * value[i]
    return front


PARETO_AXES = (("latency_ms_b64", "latency per batch of 64 (ms)"),
               ("size_mb_zipped", "size on disk, zipped (MB)"))


def pareto(cells: list[dict[str, Any]]) -> plt.Figure | None:
    """What each compression costs in robustness for what it buys: robust accuracy (higher is
    better) against latency and against size, each cell a point labelled with its compression, the
    Pareto front of the non-collapsed cells drawn; one row of two panels per (attack, eps). (Four
    panels a row, ASR too, were too small to read at the MLflow UI's size; ASR is in the heatmaps.)
    None without efficiency metrics."""
    cells = [c for c in cells if not math.isnan(c.get("latency_ms_b64", math.nan))]
    if not cells:
        return None
    rows: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        rows[(attack_label(c), c["epsilon"])].append(c)
    rows = dict(sorted(rows.items()))
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.6 * len(rows)), squeeze=False,
                             constrained_layout=True)
    labels = sorted({_method_of(c) for c in cells})
    color = {lab: f"C{n % 10}" for n, lab in enumerate(labels)}
    for r, ((attack, eps), cs) in enumerate(rows.items()):
        panels = [("robust_acc", cost) for cost in PARETO_AXES]
        for ax, (metric, (cost, cost_label)) in zip(axes[r], panels, strict=True):
            xs, ys = [c[cost] for c in cs], [c[metric] for c in cs]
            # a latency measured under load is noise (robustsweep.steps.efficiency): drawn hollow, off the front
            noisy = [cost.startswith("latency") and is_latency_noisy(c) for c in cs]
            for c, x, y, bad in zip(cs, xs, ys, noisy, strict=True):
                lab = compression_label(c)
                ax.scatter(x, y, marker="x" if is_collapsed(c) else "o", s=30, zorder=3,
                           **({"facecolors": "none", "edgecolors": color[_method_of(c)]} if bad and
                              not is_collapsed(c) else {"color": color[_method_of(c)]}))
                note = (" (collapsed)" if is_collapsed(c) else "") + (" (latency noisy)" if bad else "")
                ax.annotate(lab + note, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
            # a collapsed model's robust accuracy (ASR) describes a broken model: never on the front
            ok = [i for i, c in enumerate(cs) if not is_collapsed(c) and not noisy[i] and not math.isnan(ys[i])]
            front = [ok[i] for i in pareto_front([xs[i] for i in ok], [ys[i] for i in ok],
                                                 higher_is_better=metric == "robust_acc")]
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="0.3", lw=1,
                    label="Pareto front (collapsed models excluded)")
            ax.set_xlabel(cost_label)
            ax.set_ylabel(metric + (" (higher is better)" if metric == "robust_acc" else " (lower is better)"))
            ax.set_title(f"{attack} {_eps_label(eps, attack)}", fontsize=11)
            ax.legend(fontsize=8)
    fig.suptitle("What each compression costs in robustness for what it buys (each point a cell; x: "
                 "collapsed model; hollow: latency measured under load, off the front)", fontsize=10)
    return fig


def defence_label(cell: dict[str, Any]) -> str:
    """The dense baseline's training objective and the fine-tune after compression, if any:
    ``clean``, ``fast_at``, ``clean + ft fast_at`` (runs from before objectives: ``clean``)."""
    objective = cell.get("objective.name") or "clean"
    ft = cell.get("defend.name") or "none"
    return objective if ft == "none" else f"{objective} + ft {ft}"


def tradeoff(cells: list[dict[str, Any]]) -> plt.Figure:
    """The robustness-accuracy trade-off (Tsipras et al. 2019, arXiv:1805.12152) seen across
    compression: clean accuracy (x) against robust accuracy (y), one line per defence and
    compression method through its sparsities (labelled), 95 % Wilson intervals on both axes; one
    panel per (attack, eps). On the diagonal the attack fools nothing; a collapsed model is an x."""
    panels: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        panels[(attack_label(c), c["epsilon"])].append(c)
    panels = dict(sorted(panels.items()))
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.6 * nrow), squeeze=False,
                             constrained_layout=True)
    series_names = sorted({(defence_label(c), c["prune.method"]) for c in cells})
    color = {s: f"C{n % 10}" for n, s in enumerate(series_names)}
    for ax, ((attack, eps), cs) in zip(axes.flat, panels.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, zorder=1)
        for name in series_names:
            pts = sorted((c for c in cs if (defence_label(c), c["prune.method"]) == name),
                         key=lambda c: c["sparsity"])
            if not pts:
                continue
            xs, ys = [c["clean_acc"] for c in pts], [c["robust_acc"] for c in pts]
            ax.plot(xs, ys, color=color[name], lw=1, zorder=2, label=f"{name[0]} ({name[1]})")
            for c, x, y in zip(pts, xs, ys, strict=True):
                n = c.get("n_eval", math.nan)
                if n == n and n > 0:
                    lo, hi = wilson(x * n, n)
                    rlo, rhi = wilson(y * n, n)
                    # max(0, .): at 0 or 1 the interval's end equals the point up to rounding
                    ax.errorbar(x, y, xerr=[[max(0.0, x - lo)], [max(0.0, hi - x)]],
                                yerr=[[max(0.0, y - rlo)], [max(0.0, rhi - y)]], color=color[name], lw=0.6,
                                zorder=2)
                ax.scatter(x, y, color=color[name], marker="x" if is_collapsed(c) else "o", s=28, zorder=3)
                ax.annotate(f"{c['sparsity']:.2f}", (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel("robust accuracy")
        ax.set_title(f"{attack} {_eps_label(eps, attack)}", fontsize=9)
        ax.legend(fontsize=7, title="defence (prune method)", title_fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Robustness-accuracy trade-off per defence across sparsity (labels: sparsity; x: "
                 "collapsed model; grey: robust = clean)", fontsize=10)
    return fig


def certified(cells: list[dict[str, Any]]) -> plt.Figure | None:
    """How much of the attack's robust accuracy is proven: per bound method and attack, certified
    (lower bound, dashed) and empirical (upper bound, solid) robust accuracy against sparsity, one
    band between them per eps; for randomized smoothing, certified accuracy against the L2 radius,
    one line per sparsity. None without certify cells."""
    cells = [c for c in cells if (c.get("certify.name") or "none") != "none"
             and not math.isnan(c.get("certified_acc", math.nan))]
    if not cells:
        return None
    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        panels[(c["certify.name"], attack_label(c), defence_label(c))].append(c)
    panels = dict(sorted(panels.items()))
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.4 * nrow), squeeze=False,
                             constrained_layout=True)
    for ax, ((method, attack, defence), cs) in zip(axes.flat, panels.items(), strict=False):
        if method == "smoothing":
            for n, c in enumerate(sorted(cs, key=lambda c: c["sparsity"])):
                at = sorted((float(k.rsplit("_", 1)[1]), v) for k, v in c["all_metrics"].items()
                            if k.startswith("certified_acc_at_"))
                ax.plot([r for r, _ in at], [v for _, v in at], marker="o", color=f"C{n % 10}",
                        label=f"sparsity {c['sparsity']:.2f}" + (" (collapsed)" if is_collapsed(c) else ""))
            ax.set_xlabel("L2 radius (pixel units)")
            ax.set_ylabel("certified accuracy (smoothed classifier)")
            ax.set_title(f"randomized smoothing, {defence}", fontsize=9)
        else:
            by_eps: dict[float, list[dict[str, Any]]] = defaultdict(list)
            for c in cs:
                by_eps[c["epsilon"]].append(c)
            for n, (eps, es) in enumerate(sorted(by_eps.items())):
                es = sorted(es, key=lambda c: c["sparsity"])
                xs = [c["sparsity"] for c in es]
                emp, cert = [c["robust_acc"] for c in es], [c["certified_acc"] for c in es]
                color = f"C{n % 10}"
                ax.plot(xs, emp, color=color, marker="o",
                        label=f"{attack} {_eps_label(eps, attack)} (upper bound)")
                ax.plot(xs, cert, color=color, marker="s", ls="--",
                        label=f"{method} {_eps_label(eps, attack)} (certified, lower bound)")
                ax.fill_between(xs, cert, emp, color=color, alpha=0.15)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("robust accuracy")
            ax.set_title(f"{method} vs {attack}, {defence}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Certified (proven) and empirical (attacked) robust accuracy: the band is what no one "
                 "has proven", fontsize=10)
    return fig


def write_summary(client: Any, parent_run_id: str, out_dir: Path,
                  cells: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write the summary files for a sweep (or for ``cells``, e.g. a whole experiment's) into
    ``out_dir``; return its cells."""
    cells = collect_cells(client, parent_run_id) if cells is None else cells
    if not cells:
        raise SummaryError(f"sweep run {parent_run_id} has no FINISHED child runs to summarise")
    out_dir.mkdir(parents=True, exist_ok=True)
    for metric in ("asr", "robust_acc"):
        fig = heatmap(cells, metric)
        fig.savefig(out_dir / f"heatmap_{metric}.png", dpi=110)
        plt.close(fig)
    fig = curves(cells)
    fig.savefig(out_dir / "curves.png", dpi=110)
    plt.close(fig)
    # each figure that has something to show (a builder returns None otherwise)
    for name, build in (("attention_drift", lambda: attention_drift(client, cells)),
                        ("drift", lambda: drift_figure(cells)),
                        ("security_curves", lambda: security_curves(client, cells)),
                        ("pareto", lambda: pareto(cells)), ("tradeoff", lambda: tradeoff(cells)),
                        ("certified", lambda: certified(cells))):
        fig = build()
        if fig is not None:
            fig.savefig(out_dir / f"{name}.png", dpi=110)
            plt.close(fig)
    param_keys = sorted({k for c in cells for k in c["params"]})
    with open(out_dir / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        metrics = key_metrics()
        w.writerow(["run_id", "cell_id", "suspect", *metrics, *param_keys])
        for c in cells:
            w.writerow([c["run_id"], c["cell_id"], c["suspect"], *[c[k] for k in metrics],
                        *[c["params"].get(k, "") for k in param_keys]])
    log.info("summary of %d cell%s written to %s", len(cells), "" if len(cells) == 1 else "s", out_dir)
    return cells
